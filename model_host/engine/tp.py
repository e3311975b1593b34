"""Tensor-parallel serving: rank 0 schedules and broadcasts each forward; the other ranks follow.

Every rank holds its share of the weights (:mod:`model_host.parallel`) and a full replica of
the paged latent cache with the same blocks, so a forward needs, per sequence, only what the
runner reads from it: the tokens to feed, the length, how many are cached, and the block
table.  Rank 0's :class:`DriverRunner` sends that :class:`StepPlan` over the gloo control
group right before running the forward itself; :func:`follow` runs the same forward on a
worker.  The collectives inside the forward then line up rank by rank, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model_host.dist import DistContext
from model_host.engine.paged_cache import PagedLatentCache
from model_host.engine.runner import ModelRunner
from model_host.engine.scheduler import PrefillChunk
from model_host.engine.sequence import Sequence
from model_host.model import DeepseekV3


@dataclass
class Row:
    """The part of a :class:`Sequence` that a forward reads (and ``num_computed``, which it sets)."""

    token_ids: list[int]
    length: int
    num_computed: int
    block_table: list[int] = field(default_factory=list)
    id: int = -1  # the sequence's: each rank keeps its block table on the device by it
    table_version: int = 0

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class StepPlan:
    """One forward: "prefill" (the step's chunks, packed), "decode" (last tokens, and the short
    chunks that ride along as rows), or "stop"."""

    kind: str
    rows: tuple[Row, ...] = ()
    chunks: tuple[Row, ...] = ()


def _prefill_row(c: PrefillChunk) -> Row:
    # Tokens before the chunk are cached: send the chunk, padded in front so indices agree; the
    # row's token_ids end where the chunk ends, its length is the sequence's.
    return Row([0] * c.start + c.seq.token_ids[c.start : c.end], len(c.seq), c.start, list(c.seq.block_table),
               c.seq.id, c.seq.table_version)


def _chunk(row: Row) -> PrefillChunk:
    return PrefillChunk(row, row.num_computed, len(row.token_ids) - row.num_computed)  # type: ignore[arg-type]


def _decode_row(seq: Sequence) -> Row:
    return Row([seq.token_ids[-1]], len(seq), seq.num_computed, list(seq.block_table), seq.id, seq.table_version)


class DriverRunner(ModelRunner):
    """Rank 0's runner: broadcast the plan of each forward, then run it as on one GPU."""

    device_tokens = False  # the plan carries each row's tokens from the host

    def __init__(self, model: DeepseekV3, cache: PagedLatentCache, ctx: DistContext,
                 cuda_graphs: bool | None = None) -> None:
        super().__init__(model, cache, cuda_graphs)
        self.ctx = ctx

    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        self.ctx.broadcast(StepPlan("prefill", tuple(_prefill_row(c) for c in chunks)))
        return super().prefill(chunks)

    def decode(self, seqs: list[Sequence], chunks: list[PrefillChunk] = (),
               fill: tuple[list[int], list[int], torch.Tensor] | None = None) -> torch.Tensor:
        if fill is not None:  # the plan carries host tokens: the other ranks cannot read rank 0's device
            raise ValueError("tensor-parallel decode needs every token on the host: build the engine "
                             "with EngineConfig(overlap=False)")
        self.ctx.broadcast(StepPlan("decode", tuple(_decode_row(s) for s in seqs), tuple(_prefill_row(c) for c in chunks)))
        return super().decode(seqs, chunks)

    def shutdown(self) -> None:
        """Release the workers from :func:`follow`."""
        self.ctx.broadcast(StepPlan("stop"))


def follow(runner: ModelRunner, ctx: DistContext) -> int:
    """A worker rank's loop: run rank 0's forwards until it says stop; returns the step count."""
    steps = 0
    while True:
        plan: StepPlan = ctx.broadcast()
        if plan.kind == "stop":
            return steps
        if plan.kind == "prefill":
            runner.prefill([_chunk(r) for r in plan.rows])
        else:
            runner.decode(list(plan.rows), [_chunk(r) for r in plan.chunks])  # type: ignore[arg-type]
        steps += 1
