"""DeviceBlockTables: the device-side tables a step gathers equal the tables BlockManager keeps,
through appends, speculative truncation, preemption and re-admission, slots that are never
released, and more sequences than slots."""

from __future__ import annotations

import random

import torch

from model_host.engine.block_manager import BlockManager
from model_host.engine.block_tables import DeviceBlockTables
from model_host.engine.sequence import Sequence
from model_host.sampler import SamplingParams


def _check(tables: DeviceBlockTables, seqs: list[Sequence]) -> None:
    got = tables.gather(seqs)
    assert got.shape == (len(seqs), tables.width)
    for row, s in zip(got.tolist(), seqs, strict=True):
        assert row[: len(s.block_table)] == s.block_table


def test_gathered_tables_follow_every_change_the_block_manager_makes():
    rnd = random.Random(0)
    blocks = BlockManager(400, 4, spec_tokens=2)
    tables = DeviceBlockTables(width=3, device=torch.device("cpu"), slots=2)  # both grow
    seqs = [Sequence(list(range(i, i + rnd.randint(2, 9))), SamplingParams(), None, None) for i in range(6)]
    for s in seqs:
        blocks.allocate(s)
    for step in range(60):
        live = [s for s in seqs if s.block_table]
        for s in live:
            s.token_ids.append(7)
            blocks.append_slot(s)
            if rnd.random() < 0.2:  # rejected drafts: tail blocks given back
                s.num_computed = max(1, len(s) - 3)
                blocks.truncate(s)
            if rnd.random() < 0.05:  # preempted, then admitted again with new blocks
                blocks.release(s)
                blocks.allocate(s)
        rows = [s for s in live for _ in range(rnd.randint(1, 3))]  # prompt rows repeat a sequence
        _check(tables, rows)
        if step % 7 == 0:
            tables.forget(live[0].id)  # some ends are announced, others never are
    assert tables.width >= max(len(s.block_table) for s in seqs)


def test_unchanged_tables_upload_only_the_slot_index():
    blocks = BlockManager(100, 4)
    tables = DeviceBlockTables(width=8, device=torch.device("cpu"))
    seqs = [Sequence(list(range(10)), SamplingParams(), None, None) for _ in range(3)]
    for s in seqs:
        blocks.allocate(s)
    _check(tables, seqs)
    before = {s.id: tables.slot_of[s.id] for s in seqs}
    _check(tables, seqs)
    assert {s.id: tables.slot_of[s.id] for s in seqs} == before  # same slots, versions unchanged
