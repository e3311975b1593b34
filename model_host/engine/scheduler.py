"""Continuous batching: admit (prefill) waiting requests between batched decode steps.

Each step is either a prefill of newly admitted sequences or one decode step of every running
sequence. When the KV cache runs out of blocks during decode, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
later (its generated tokens are kept). Nothing is allocated that the cache cannot hold, so the
server queues instead of running out of memory.
"""

from __future__ import annotations

from collections import deque

from model_host.engine.block_manager import BlockManager
from model_host.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, max_prefill_tokens: int):
        self.blocks = blocks
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step and whether it is a prefill step."""
        prefill: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(prefill) < self.max_batch:
            seq = self.waiting[0]
            if prefill and tokens + len(seq) > self.max_prefill_tokens:
                break
            if not self.blocks.can_allocate(seq):
                break
            self.blocks.allocate(seq)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            if not seq.admitted:
                seq.prompt_cached_tokens = seq.num_cached_tokens
                seq.admitted = True
            prefill.append(seq)
            tokens += len(seq) - seq.num_cached_tokens
        if prefill:
            self.running.extend(prefill)
            return prefill, True

        batch: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.append_slot(seq)
                batch.append(seq)
        return batch, False

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
