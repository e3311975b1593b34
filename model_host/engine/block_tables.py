"""Block tables of running sequences, kept on the device between steps.

A decode step needs a ``[rows, width]`` table of block ids. Built from Python lists every step,
that was 128 x 130 ints converted and copied per step at concurrency 128 (8% of the engine
thread's samples on an H100, bench/serve_bench.py --py-spy). Here every sequence keeps a row
(a slot) of one device tensor, rewritten only when BlockManager has changed its table (its
``table_version``: on admission, and once per ``block_size`` tokens); a step uploads those rows
and each row's slot in one copy, and gathers its table on the device.
"""

from __future__ import annotations

import torch

from model_host.transfer import upload


class DeviceBlockTables:
    def __init__(self, width: int, device: torch.device, slots: int = 64):
        self.width = max(1, width)
        self.device = device
        self.store = torch.zeros(slots, self.width, dtype=torch.long, device=device)
        self.slot_of: dict[int, tuple[int, int]] = {}  # sequence id -> (slot, table_version stored)
        self.free = list(range(slots))

    def gather(self, seqs) -> torch.Tensor:
        """The tables of ``seqs`` (a sequence may repeat), ``[len(seqs), width]`` on the device;
        entries past a sequence's blocks are stale or 0, which attention masks by position."""
        longest = max(len(s.block_table) for s in seqs)
        if longest > self.width:
            self._resize(self.store.shape[0], longest)
        idx, dirty, rows = [], [], []
        for s in seqs:
            slot, version = self.slot_of.get(s.id, (None, None))
            if slot is None:
                slot = self._take(seqs)
            if version != s.table_version:
                self.slot_of[s.id] = (slot, s.table_version)
                dirty.append(slot)
                rows += s.block_table
                rows += [0] * (self.width - len(s.block_table))
            idx.append(slot)
        flat = upload(idx + dirty + rows, torch.long, self.device)  # one copy per step
        n, d = len(idx), len(dirty)
        if d:
            self.store.index_copy_(0, flat[n : n + d], flat[n + d :].view(d, self.width))
        return self.store[flat[:n]]

    def forget(self, seq_id: int) -> None:
        """A sequence ended: its slot is free for the next."""
        entry = self.slot_of.pop(seq_id, None)
        if entry is not None:
            self.free.append(entry[0])

    def _take(self, seqs) -> int:
        if not self.free:  # sequences that ended without forget(): any slot not in this step
            live = {s.id for s in seqs}
            for sid in [sid for sid in self.slot_of if sid not in live]:
                self.forget(sid)
        if not self.free:
            self._resize(2 * self.store.shape[0], self.width)
        return self.free.pop()

    def _resize(self, slots: int, width: int) -> None:
        old = self.store
        self.store = torch.zeros(slots, width, dtype=torch.long, device=self.device)
        self.store[: old.shape[0], : old.shape[1]] = old
        self.free += range(old.shape[0], slots)
        self.width = width
