"""Packed prefill: every prefill chunk of a step in one varlen forward."""

from __future__ import annotations

from model_host.engine.packing import pack_chunks
from model_host.engine.scheduler import PrefillChunk
from model_host.engine.sequence import Sequence
from model_host.sampler import SamplingParams


def _seq(tokens: list[int], table: list[int]) -> Sequence:
    seq = Sequence(tokens, SamplingParams(), decoder=None, generator=None)
    seq.block_table = table
    return seq


def test_pack_chunks_layout():
    """Sequence a: 6 tokens, a cached prefix of 4, its last 2 now (ends it); sequence b: 7
    tokens, its first chunk of 5 (does not end it). Block size 4."""
    a = _seq(list(range(100, 106)), [7, 2])
    b = _seq(list(range(200, 207)), [5, 9])
    p = pack_chunks([PrefillChunk(a, 4, 2), PrefillChunk(b, 0, 5)], block_size=4, device="cpu")
    assert p.ids.tolist() == [[104, 105, 200, 201, 202, 203, 204]]
    assert p.positions.tolist() == [[4, 5, 0, 1, 2, 3, 4]]
    assert p.slots.tolist() == [8, 9, 20, 21, 22, 23, 36]  # block * 4 + offset
    assert p.key_slots.tolist() == [28, 29, 30, 31, 8, 9, 20, 21, 22, 23, 36]
    assert p.cu_seqlens_q.tolist() == [0, 2, 7] and p.cu_seqlens_k.tolist() == [0, 6, 11]
    assert p.last.tolist() == [1]  # only a's chunk ends its sequence
