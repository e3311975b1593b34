"""Latent KV cache storage for MLA.

MLA keeps, per token and layer, only the normalized latent ``c_kv`` [kv_lora_rank] and the
shared rotated key ``k_pe`` [qk_rope_head_dim]: (512 + 64) * 2 = 1,152 bytes in BF16 versus
128 heads * (192 + 128) * 2 = 81,920 bytes for expanded K/V.

Attention code talks to the cache only through :class:`LatentCache` (``write`` the new tokens'
latents at their positions, ``read`` a layer's first ``length`` positions), so the serving
engine can swap in a paged implementation (block tables, prefix sharing) without touching the
attention math.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .config import ModelConfig


class LatentCache(ABC):
    """Interface: per-layer storage of (c_kv, k_pe) indexed by (batch row, position)."""

    num_layers: int
    kv_lora_rank: int
    rope_dim: int
    dtype: torch.dtype

    @abstractmethod
    def write(self, layer: int, positions: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store ``c_kv`` [B, S, R] and ``k_pe`` [B, S, P] of row b at ``positions[b]`` [B, S]."""

    @abstractmethod
    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (c_kv [B, length, R], k_pe [B, length, P]) for positions ``0..length-1``.

        Positions a row has not written yet hold garbage; attention masks them by position.
        """

    # A paged cache's [B, max_blocks] tables of the bound rows (kernels walk them); None here.
    block_tables: torch.Tensor | None = None

    def slot_mapping(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Flat cache rows ([B * S], the same for every layer) of ``positions``, where the cache
        stores layers as flat slot arrays (see :meth:`flat`); None otherwise."""
        return None

    def bytes_per_token_per_layer(self) -> int:
        """Storage cost of one token in one layer (the number MLA is built to minimise)."""
        return (self.kv_lora_rank + self.rope_dim) * self.dtype.itemsize


class ContiguousLatentCache(LatentCache):
    """Dense ``[layers, batch, max_seq_len, dim]`` buffers; simple and fine for one process."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_seq_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_layers, self.batch_size, self.max_seq_len = num_layers, batch_size, max_seq_len
        self.kv_lora_rank, self.rope_dim, self.dtype = kv_lora_rank, rope_dim, dtype
        self.c_kv = torch.zeros(num_layers, batch_size, max_seq_len, kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(num_layers, batch_size, max_seq_len, rope_dim, dtype=dtype, device=device)

    @classmethod
    def for_config(cls, cfg: ModelConfig, batch_size: int, max_seq_len: int, *, include_mtp: bool = False,
                   dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None
                   ) -> ContiguousLatentCache:
        """A cache for every decoder layer (plus the MTP layer, index ``num_hidden_layers``)."""
        layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
        return cls(layers, batch_size, max_seq_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=dtype, device=device)

    def write(self, layer: int, positions: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        if positions.device.type == "cpu" and positions.numel() and int(positions.max()) >= self.max_seq_len:
            raise IndexError(f"position {int(positions.max())} >= cache max_seq_len {self.max_seq_len}")
        rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1).expand_as(positions)
        self.c_kv[layer][rows, positions] = c_kv.to(self.dtype)
        self.k_pe[layer][rows, positions] = k_pe.to(self.dtype)

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.c_kv[layer, :, :length], self.k_pe[layer, :, :length]

    def nbytes(self) -> int:
        """Total bytes held by the buffers."""
        return self.c_kv.nbytes + self.k_pe.nbytes
