"""`EngineLoop`: drives an :class:`~model_host.engine.engine.Engine` for the HTTP server.

New requests and aborts arrive through a thread-safe inbox, so the engine's state is only ever
touched by the thread that runs the loop.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable

from model_host.engine.engine import Engine
from model_host.engine.outputs import StepOutput
from model_host.sampler import SamplingParams

log = logging.getLogger(__name__)


class EngineStopped(RuntimeError):
    """The engine thread is gone (a failed step, or shutdown): no request can be served."""


Callback = Callable[[StepOutput | Exception], None]


class EngineLoop:
    """Drives an Engine, on the calling thread (:meth:`run`) or a background one (:meth:`start`);
    callbacks run on the engine's thread.

    `model-host serve` runs it on the main thread, the one that loaded the model, and uvicorn on
    a side thread: on the CPU, torch's OpenMP ops issued from a second thread, once the main
    thread has used its own OpenMP team, ran 2.5-4x slower (libgomp keeps one worker pool per
    master thread, and the pools contend; measured in docs/gpu_notes.md "CPU serving").

    A callback gets each StepOutput of its request, or one Exception when the request failed
    (the engine refused it, or the engine stopped).  A failure that belongs to one request
    (its admission, its decoding) fails that request only.  A failed model step is not one
    request's fault and leaves the device in an unknown state (CUDA errors are sticky), so the
    loop fails every request in flight and stops: `alive` turns False, `/health` answers 503, and
    the orchestrator restarts the process instead of the server hanging or serving garbage.
    """

    def __init__(self, engine: Engine, on_step: Callable[[list[StepOutput]], None] | None = None,
                 on_delivered: Callable[[], None] | None = None):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.callbacks: dict[int, Callback] = {}
        self.aborts: dict[int, threading.Event] = {}  # sequence id -> its request's abort switch
        self.on_step = on_step
        # Called on the engine's thread after each turn of the loop has run its callbacks (and
        # after the last ones at shutdown): a consumer that batches callbacks hands them over
        # here, once per step (the server's mailboxes: one event-loop wake-up per step).
        self.on_delivered = on_delivered
        self._stop = threading.Event()
        self._closed = False  # no more submissions; guarded by _lock with the inbox's last drain
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None  # the background thread of start(), if any
        self._running = False
        self.thread: threading.Thread | None = None  # the thread that drives the engine, once running
        self.recent_tokens: collections.deque[tuple[float, int]] = collections.deque(maxlen=512)
        self.error: BaseException | None = None

    @property
    def alive(self) -> bool:
        """Running and taking requests (False from the moment the loop starts failing its requests)."""
        return self._running and not self._closed

    def start(self) -> None:
        """Run on a background thread (tests, and callers whose main thread is busy)."""
        self._running = True
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Run on the calling thread until :meth:`stop` (from any thread) or a failed step."""
        self._running = True
        self._run()

    def stop(self, timeout: float = 10) -> None:
        """Stop after the current step; requests still in flight get EngineStopped."""
        self._stop.set()
        self.inbox.put(None)
        if self._thread is not None and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout)

    def submit(self, prompt_ids: list[int], params: SamplingParams, callback: Callback,
               abort: threading.Event | None = None) -> threading.Event:
        """Queue a request; returns the event (``abort``, or a new one) to set for aborting it.
        Validate with engine.check first. Raises EngineStopped when the engine thread has ended."""
        abort = abort or threading.Event()
        with self._lock:
            if self._closed:
                raise EngineStopped(f"the engine has stopped: {self.error or 'shutting down'}")
            self.inbox.put(("add", prompt_ids, params, callback, abort))
        return abort

    @staticmethod
    def _notify(callback: Callback, item: StepOutput | Exception) -> bool:
        try:
            callback(item)
            return True
        except Exception:  # e.g. the server's event loop is closed: only this request is lost
            log.exception("delivering a result failed")
            return False

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            _, prompt_ids, params, callback, abort = item
            try:
                seq = self.engine.add(prompt_ids, params)
            except Exception as e:  # this request only (the HTTP layer validates, this is the backstop)
                log.warning("request refused by the engine: %s", e)
                self._notify(callback, e)
            else:
                self.callbacks[seq.id] = callback
                self.aborts[seq.id] = abort
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None

    def _apply_aborts(self) -> None:
        for sid in [sid for sid, ev in self.aborts.items() if ev.is_set()]:
            seq = self.engine.by_id.get(sid)
            cb = self.callbacks.pop(sid, None)
            del self.aborts[sid]
            if seq is None:
                continue
            self.engine.abort(seq)
            if cb:  # an explicit /v1/abort: the request's handler ends with finish_reason "abort"
                self._notify(cb, StepOutput(seq, "", None, True))

    def _deliver(self, outs: list[StepOutput]) -> None:
        n = sum(1 for o in outs if o.token is not None)
        self.recent_tokens.append((time.perf_counter(), n))
        if self.on_step:
            try:
                self.on_step(outs)
            except Exception:
                log.exception("the on_step hook failed")
        for o in outs:
            cb = self.callbacks.get(o.seq.id)
            if cb and not self._notify(cb, o) and not o.finished and o.seq.id in self.aborts:
                self.aborts[o.seq.id].set()  # nobody is listening: free its blocks next step
            if o.finished:
                self.callbacks.pop(o.seq.id, None)
                self.aborts.pop(o.seq.id, None)

    def _run(self) -> None:
        eng = self.engine
        self.thread = threading.current_thread()
        try:
            while not self._stop.is_set():
                self._drain(block=not eng.has_work)
                self._apply_aborts()
                if not eng.has_work:
                    self._delivered()  # refusals and abort notices
                    continue
                try:
                    outs = eng.step()
                except Exception as e:
                    log.exception("engine step failed; the engine stops and /health reports 503")
                    self.error = e
                    return
                self._deliver(outs)
                self._delivered()
        except BaseException as e:  # a bug in the loop itself: never die silently
            log.exception("engine loop failed")
            self.error = e
        finally:
            self._close()
            self._delivered()
            self._running = False

    def _delivered(self) -> None:
        if self.on_delivered is not None:
            try:
                self.on_delivered()
            except Exception:  # e.g. the server's event loop is closed: its requests are lost
                log.exception("the on_delivered hook failed")

    def _close(self) -> None:
        """Fail every request still queued or running, and refuse new ones."""
        err = EngineStopped(f"the engine stopped: {self.error}" if self.error else "the server is shutting down")
        with self._lock:
            self._closed = True
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._notify(item[3], err)
        for seq in list(self.engine.by_id.values()):
            self.engine.abort(seq)
            cb = self.callbacks.pop(seq.id, None)
            if cb:
                self._notify(cb, err)
        self.aborts.clear()

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        n = sum(c for t, c in self.recent_tokens if now - t <= window)
        return n / window
