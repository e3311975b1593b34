"""All prefill chunks of a step as one packed (varlen) batch, as nano-vllm's model_runner does.

The chunks' tokens are concatenated into one row; ``cu_seqlens_q`` marks where each sequence's
queries start, ``cu_seqlens_k`` where its keys start. A sequence's keys are its whole context so
far (the cached prefix, earlier chunks and this chunk: positions ``0 .. end - 1``), read from the
paged cache through ``key_slots``, so its queries are the last of its keys.
"""

from __future__ import annotations

import dataclasses

import torch

from model_host.engine.scheduler import PrefillChunk
from model_host.mla import Varlen
from model_host.transfer import to_device


@dataclasses.dataclass(frozen=True)
class PackedChunks:
    ids: torch.Tensor  # [1, Tq] the chunks' tokens, concatenated
    positions: torch.Tensor  # [1, Tq] absolute position of each
    varlen: Varlen  # new tokens' cache slots, every sequence's key slots (0 .. end - 1), cu_seqlens
    last: torch.Tensor  # [m] query index of the final token of each chunk that ends its sequence


def _slots(table: list[int], positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return torch.tensor(table, dtype=torch.long)[positions // block_size] * block_size + positions % block_size


def pack_chunks(chunks: list[PrefillChunk], block_size: int, device: torch.device | str) -> PackedChunks:
    """Built on the host (small integer work); each index tensor is copied to ``device`` once."""
    ids, pos, slots, key_slots, last = [], [], [], [], []
    cu_q, cu_k = [0], [0]
    for c in chunks:
        table = c.seq.block_table
        p = torch.arange(c.start, c.end)
        ids += c.seq.token_ids[c.start : c.end]
        pos.append(p)
        slots.append(_slots(table, p, block_size))
        key_slots.append(_slots(table, torch.arange(c.end), block_size))
        cu_q.append(cu_q[-1] + c.length)
        cu_k.append(cu_k[-1] + c.end)
        if c.last:
            last.append(cu_q[-1] - 1)

    def dev(t: torch.Tensor) -> torch.Tensor:
        return to_device(t, device)

    return PackedChunks(
        ids=dev(torch.tensor([ids], dtype=torch.long)), positions=dev(torch.cat(pos).unsqueeze(0)),
        varlen=Varlen(slots=dev(torch.cat(slots)), key_slots=dev(torch.cat(key_slots)),
                      cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
                      cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32)),
        last=dev(torch.tensor(last, dtype=torch.long)))
