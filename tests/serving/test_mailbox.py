"""server/mailbox.py: outputs posted from the engine thread reach their queues in order, and the
event loop is woken once per flush (once per engine step), not once per output."""

from __future__ import annotations

import asyncio
import threading

import pytest

from model_host.server.mailbox import Mailbox, Mailboxes


class _CountingLoop(asyncio.SelectorEventLoop):
    """A real event loop that counts the wake-ups other threads ask of it."""

    def __init__(self) -> None:
        super().__init__()
        self.wakeups = 0

    def call_soon_threadsafe(self, *args, **kwargs):
        self.wakeups += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def test_a_step_of_outputs_wakes_the_loop_once_and_keeps_order():
    loop = _CountingLoop()
    try:
        box = Mailbox(loop)
        queues = [asyncio.Queue() for _ in range(3)]

        def engine_thread():  # two steps, each with an output for each of three requests
            for step in range(2):
                for i, q in enumerate(queues):
                    box.post(q, (step, i))
                box.flush()
            box.flush()  # nothing new: no wake-up

        async def main():
            t = threading.Thread(target=engine_thread)
            t.start()
            t.join()
            for _ in range(3):
                await asyncio.sleep(0)
            return [[q.get_nowait() for _ in range(q.qsize())] for q in queues]

        got = loop.run_until_complete(main())
        assert got == [[(s, i) for s in range(2)] for i in range(3)]
        assert loop.wakeups == 2  # one per step (6, one per output, before the mailbox)
    finally:
        loop.close()


def test_posting_to_a_closed_loop_raises():
    loop = asyncio.new_event_loop()
    box = Mailbox(loop)
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        box.post(asyncio.Queue(), 1)


def test_a_closed_loop_does_not_hold_back_the_other_loops_outputs():
    """Two event loops serve one app; one closes. Its mailbox is dropped at the next flush and
    the other loop still gets its outputs (the engine's last flush carries the EngineStopped
    notices: a request left parked would wait forever)."""
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        boxes = Mailboxes()
        q1, q2 = asyncio.Queue(), asyncio.Queue()
        boxes.for_loop(first).post(q1, "lost")
        boxes.for_loop(second).post(q2, "kept")
        first.close()
        boxes.flush()
        second.run_until_complete(asyncio.sleep(0))
        assert q2.get_nowait() == "kept"
    finally:
        second.close()
