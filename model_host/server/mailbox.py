"""Step outputs from the engine thread to the requests' queues on the event loop.

A step produces one output per running request, all at once. Handing each to the event loop
with its own ``call_soon_threadsafe`` (a lock, a handle and a self-pipe write each, then one
loop iteration each) cost both threads GIL time per token; at concurrency 128 the engine and
HTTP threads together held the GIL 97% of the time (docs/gpu_notes.md). The mailbox collects a
step's outputs and wakes the loop once per step (EngineLoop's ``on_delivered`` hook calls
:meth:`Mailbox.flush`); a reader then finds all of a step's outputs for its request queued
together (a speculative round's k+1 tokens stream as one event).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class Mailbox:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Any]] = []

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        """From any thread: put ``item`` on ``queue`` (a queue of this mailbox's loop) at the next
        :meth:`flush`, in order. Raises RuntimeError once the loop is closed (nobody to read it)."""
        if self.loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._items.append((queue, item))

    def flush(self) -> None:
        """From the posting thread, after a batch (the engine loop calls it once per step): one
        wake-up of the event loop delivers everything posted since the last flush."""
        with self._lock:
            if not self._items:
                return
            items, self._items = self._items, []
        self.loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class Mailboxes:
    """One mailbox per event loop serving an app (uvicorn runs one; tests and embedders may run
    several). :meth:`flush` is the EngineLoop's ``on_delivered`` hook."""

    def __init__(self) -> None:
        self._boxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}

    def for_loop(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        """The running loop's mailbox (called on that loop's thread)."""
        return self._boxes.get(loop) or self._boxes.setdefault(loop, Mailbox(loop))

    def flush(self) -> None:
        """Each box on its own: a closed loop's box is dropped (nobody is left to read it), and
        the other loops' outputs are still delivered."""
        for loop, box in list(self._boxes.items()):
            try:
                if loop.is_closed():
                    raise RuntimeError("the event loop is closed")
                box.flush()
            except RuntimeError:
                self._boxes.pop(loop, None)

