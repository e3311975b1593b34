"""Continuous batching with chunked prefill: every step decodes all running sequences that are
past their prompt and spends at most ``max_prefill_tokens`` on prompt work.

A running sequence still owes the tokens ``token_ids[num_computed:]`` to the cache. When it owes
exactly one (the last sampled token, or a prompt whose every other token was a prefix-cache hit)
it is a decode row; when it owes more it gets a prefill chunk of at most the step's remaining
budget, so a long prompt is spread over several steps and never holds the decode rows back by
more than the budget. Prefills already under way continue before new requests are admitted.

When the KV cache runs out of blocks during decode, the newest running sequence is preempted:
its blocks are freed and it goes back to the front of the queue, to be recomputed later (its
generated tokens are kept). Admission allocates a sequence's blocks for its whole prompt at once,
so a prefill in progress never runs out of room and the server queues instead of running out
of memory.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque

from model_host.engine.block_manager import BlockManager
from model_host.engine.sequence import Sequence, Status


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    """Compute ``seq.token_ids[start:start + length]``; ``last`` chunks end the sequence, so their
    final position's logits are sampled."""

    seq: Sequence
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def last(self) -> bool:
        return self.end == len(self.seq)


@dataclasses.dataclass
class Batch:
    """One engine step: prefill chunks and decode rows (either list may be empty)."""

    prefill: list[PrefillChunk]
    decode: list[Sequence]

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, max_prefill_tokens: int, max_model_len: int | None = None):
        if max_prefill_tokens < 1:
            raise ValueError(f"--max-prefill-tokens must be >= 1, got {max_prefill_tokens}")
        self.blocks = blocks
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        """The next step's work. Decode rows first (they may preempt), then prefill chunks."""
        decode = self._decode_rows()
        budget = self.max_prefill_tokens
        prefill: list[PrefillChunk] = []
        for seq in self.running:
            owed = len(seq) - seq.num_computed
            if owed > 1 and budget > 0:
                prefill.append(PrefillChunk(seq, seq.num_computed, min(owed, budget)))
                budget -= prefill[-1].length
        while self.waiting and budget > 0 and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if seq.awaiting_token or not self.blocks.can_allocate(seq):  # (a victim preempted this step)
                break
            self.blocks.allocate(seq)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            if not seq.admitted:
                seq.prompt_cached_tokens = seq.num_cached_tokens
                seq.admitted = True
                seq.admitted_at = time.perf_counter()
            self.running.append(seq)
            prefill.append(PrefillChunk(seq, seq.num_computed, min(len(seq) - seq.num_computed, budget)))
            budget -= prefill[-1].length
        return Batch(prefill, decode)

    def _decode_rows(self) -> list[Sequence]:
        """Running sequences that owe exactly one token, each with a cache slot for it."""
        batch: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or len(seq) - seq.num_computed != 1:
                continue  # preempted earlier in this loop, or still prefilling
            if self._complete(seq):
                continue  # its last token is still on the device (overlapped step): it ends when read
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)  # the newest: never one already in this batch
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.append_slot(seq)
                batch.append(seq)
        return batch

    def _complete(self, seq: Sequence) -> bool:
        return seq.num_output >= seq.params.max_tokens or (
            self.max_model_len is not None and len(seq) >= self.max_model_len)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Free a finished or aborted sequence's blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED
