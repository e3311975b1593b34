"""Paged latent KV cache: MLA's (c_kv, k_pe) per token in fixed-size blocks shared via block tables.

Storage is one flat slot array per layer: slot = block_id * block_size + offset. A sequence owns
a block table (list of block ids); a full block whose tokens (and whole prefix) match another
sequence's can be shared, which is how prefix caching saves prefill work.

The engine `bind`s the block tables of the rows in a forward pass; MLA then calls `write` and
`read` exactly as on the contiguous cache, so attention code does not know about paging.

Under TritonOps, single-token decode runs the paged MLA kernel on `flat` storage and the bound
`block_tables` instead (no gathered copy of the context; lengths come from the device, which is
what lets the decode step be captured in a CUDA graph). One extra block past `num_blocks` (`scratch_block`) absorbs the writes of padding rows when a
graph captured for a larger batch replays a smaller one; the block manager never hands it out.
"""

from __future__ import annotations

import torch

from model_host.cache import LatentCache


class PagedLatentCache(LatentCache):
    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, kv_lora_rank: int, rope_dim: int,
        *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
    ) -> None:
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.kv_lora_rank, self.rope_dim, self.dtype = kv_lora_rank, rope_dim, dtype
        self.scratch_block = num_blocks  # padding rows of captured decode graphs write here
        slots = (num_blocks + 1) * block_size
        self.c_kv = torch.zeros(num_layers, slots, kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(num_layers, slots, rope_dim, dtype=dtype, device=device)
        self.block_tables: torch.Tensor | None = None  # [B, max_blocks] for the bound batch

    @staticmethod
    def blocks_for_budget(budget_bytes: int, num_layers: int, block_size: int, kv_lora_rank: int,
                          rope_dim: int, dtype: torch.dtype) -> int:
        """How many blocks fit in `budget_bytes` (the --kv-memory-gb budget)."""
        per_block = num_layers * block_size * (kv_lora_rank + rope_dim) * dtype.itemsize
        return max(int(budget_bytes // per_block), 0)

    def bind(self, block_tables: torch.Tensor) -> None:
        """Use these block tables ([B, max_blocks], padded with any valid id) for the next forward."""
        self.block_tables = block_tables

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        assert self.block_tables is not None, "bind() block tables before a forward"
        blocks = self.block_tables.gather(1, positions // self.block_size)
        return blocks * self.block_size + positions % self.block_size

    def write(self, layer: int, positions: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        slots = self._slots(positions).reshape(-1)
        self.c_kv[layer].index_copy_(0, slots, c_kv.reshape(-1, self.kv_lora_rank).to(self.dtype))
        self.k_pe[layer].index_copy_(0, slots, k_pe.reshape(-1, self.rope_dim).to(self.dtype))

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.block_tables is not None, "bind() block tables before a forward"
        b = self.block_tables.shape[0]
        pos = torch.arange(length, device=self.block_tables.device).expand(b, length)
        slots = self._slots(pos)
        return self.c_kv[layer][slots], self.k_pe[layer][slots]

    def slot_mapping(self, positions: torch.Tensor) -> torch.Tensor:
        """Flat slot of every (row, position) of the bound batch, [B * S]; the same for all layers,
        so a forward computes it once (fused kernels write the latents straight to these rows)."""
        return self._slots(positions).reshape(-1)

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_kv [slots, R], k_pe [slots, P]) of one layer, indexed by :meth:`slot_mapping`."""
        return self.c_kv[layer], self.k_pe[layer]

    def nbytes(self) -> int:
        return self.c_kv.nbytes + self.k_pe.nbytes
