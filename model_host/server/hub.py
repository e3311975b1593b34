"""The engine process's side of `--api-processes`: API processes connect over a Unix socket, send
requests and aborts, and get their outputs back, one message per engine step.

Threads here never run the engine: a reader per connection turns messages into
`EngineLoop.submit` calls and abort switches; a sender per connection pickles and writes, so a
slow or stuck API process can never block an engine step. The engine thread only appends each
output to its connection's list and, once per step (`on_delivered`), hands the lists to the
senders.
"""

from __future__ import annotations

import logging
import queue
import threading
from multiprocessing.connection import Connection, Listener

from model_host.engine.loop import EngineLoop, EngineStopped
from model_host.engine.outputs import StepOutput
from model_host.server import wire
from model_host.server.metrics import Metrics

log = logging.getLogger(__name__)


class _Link:
    """One API process: its connection, its requests' abort switches, its outputs of this step."""

    def __init__(self, conn: Connection, name: str):
        self.conn = conn
        self.name = name
        self.aborts: dict[int, threading.Event] = {}  # rid -> the engine loop's switch
        self.pending: list[tuple[int, tuple]] = []  # appended by the engine thread only
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()  # messages for the sender; None ends it

    def send_loop(self) -> None:
        while (msg := self.outbox.get()) is not None:
            try:
                self.conn.send(msg)
            except (OSError, EOFError, ValueError):  # the API process is gone: its reader cleans up
                return


class EngineHub:
    """Serves one EngineLoop (and its Metrics) to API processes on ``address`` (a Unix socket)."""

    def __init__(self, loop: EngineLoop, metrics: Metrics, address: str, authkey: bytes):
        self.loop = loop
        self.metrics = metrics
        self.listener = Listener(address, family="AF_UNIX", authkey=authkey)
        self.authkey = authkey  # what an API process proves it was started by this server with
        self.address = self.listener.address
        self._links: list[_Link] = []
        self._lock = threading.Lock()  # guards _links against the engine thread's walk
        self._stopped: str | None = None  # why the engine loop ended, once it has
        loop.on_delivered = self._flush

    def start(self) -> None:
        threading.Thread(target=self._accept, name="hub-accept", daemon=True).start()

    def close(self) -> None:
        """At shutdown, after the API processes: end the senders and stop listening."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.outbox.put(None)
        self.listener.close()

    def _accept(self) -> None:
        n = 0
        while True:
            try:
                conn = self.listener.accept()
            except OSError:  # closed
                return
            except Exception as e:  # e.g. a peer that failed the authkey handshake: keep listening
                log.warning("an API process could not connect: %s", e)
                continue
            link = _Link(conn, f"api-{n}")
            n += 1
            link.outbox.put(("hello", self.loop.engine.max_model_len))
            with self._lock:
                self._links.append(link)
                if self._stopped is not None:
                    link.outbox.put(("stopped", self._stopped))
            threading.Thread(target=link.send_loop, name=f"hub-send-{link.name}", daemon=True).start()
            threading.Thread(target=self._read, args=(link,), name=f"hub-read-{link.name}", daemon=True).start()

    def _read(self, link: _Link) -> None:
        try:
            while True:
                msg = link.conn.recv()
                kind = msg[0]
                if kind == "submit":
                    self._submit(link, *msg[1:])
                elif kind == "abort":
                    if (ev := link.aborts.get(msg[1])) is not None:
                        ev.set()
                elif kind == "ended":
                    self.metrics.request_ended(msg[1], msg[2])
                elif kind == "metrics":
                    link.outbox.put(("metrics", msg[1], self.metrics.render()))
                else:
                    raise ValueError(f"unknown message {kind!r}")
        except (EOFError, OSError):
            pass  # the API process ended (or was killed)
        except Exception:
            log.exception("bad message from %s; dropping its connection", link.name)
        # Nobody is left to read these requests: free their blocks now.
        for ev in list(link.aborts.values()):
            ev.set()
        with self._lock:
            if link in self._links:
                self._links.remove(link)
        link.outbox.put(None)
        link.conn.close()

    def _submit(self, link: _Link, rid: int, prompt_ids: list[int], params, prep_seconds: float) -> None:
        def deliver(out: StepOutput | Exception) -> None:  # on the engine thread
            link.pending.append((rid, wire.encode(out)))
            if isinstance(out, Exception) or out.finished:
                link.aborts.pop(rid, None)

        # The switch is registered before the engine can see the request: a request that ends
        # within its first step must not leave its entry behind.
        link.aborts[rid] = ev = threading.Event()
        try:
            self.loop.submit(prompt_ids, params, deliver, abort=ev)
        except EngineStopped as e:
            link.aborts.pop(rid, None)
            link.outbox.put(("out", [(rid, wire.encode(e))]))
            return
        self.metrics.request_started(len(prompt_ids), prep_seconds)

    def _flush(self) -> None:
        """The engine loop's on_delivered: this step's outputs, one message per API process. Its
        last call, after the loop has failed its requests, also tells every API process that
        the engine has ended (their /health turns 503; /metrics still answers)."""
        with self._lock:
            links = list(self._links)
            ended = self._stopped is None and not self.loop.alive
            if ended:
                self._stopped = str(self.loop.error or "the server is shutting down")
        for link in links:
            if link.pending:
                items, link.pending = link.pending, []
                link.outbox.put(("out", items))
            if ended:
                link.outbox.put(("stopped", self._stopped))
