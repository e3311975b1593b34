"""An API process of `--api-processes N`: the OpenAI routes over the engine of another process.

Each API process parses, tokenizes and streams its share of the connections (they accept from
one listening socket), so a wave of arrivals is parsed on N event loops at once, none of them
sharing a GIL with the engine. The engine process (model_host/server/hub.py) schedules, steps
and detokenizes, and sends each API process its outputs once per step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable
from multiprocessing.connection import Client

from model_host.engine.engine import check_request
from model_host.engine.loop import Callback, EngineStopped
from model_host.sampler import SamplingParams
from model_host.server import wire

log = logging.getLogger("model_host.server")


class _Abort:
    def __init__(self, engine: RemoteEngine, rid: int):
        self.engine, self.rid, self.sent = engine, rid, False

    def set(self) -> None:
        if not self.sent:
            self.sent = True
            self.engine._send(("abort", self.rid))


class RemoteEngine:
    """The EngineHandle of an API process: requests go to the engine process, outputs come back
    on a reader thread, one message per engine step."""

    def __init__(self, address: str, authkey: bytes, on_lost: Callable[[], None] | None = None):
        self.conn = Client(address, family="AF_UNIX", authkey=authkey)
        kind, self.max_model_len = self.conn.recv()
        assert kind == "hello", kind
        self.on_delivered: Callable[[], None] | None = None
        self.on_lost = on_lost  # the engine process is gone: the API process should end too
        self.error: str | None = None
        self._stopped = False  # the engine has ended (or the link is gone): no more requests
        self._lost = False  # the link is gone: nothing at all from the engine process
        self._closing = False
        self._send_lock = threading.Lock()
        self._callbacks: dict[int, Callback] = {}
        self._asks: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count()
        self._reader = threading.Thread(target=self._read, name="engine-link", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return not self._stopped

    def check(self, prompt_len: int, max_tokens: int) -> None:
        check_request(prompt_len, max_tokens, self.max_model_len)

    def submit(self, prompt_ids: list[int], params: SamplingParams, callback: Callback,
               prep_seconds: float) -> _Abort:
        if self._stopped:
            raise EngineStopped(f"the engine has stopped: {self.error or 'shutting down'}")
        rid = next(self._ids)
        self._callbacks[rid] = callback
        if self._stopped and self._callbacks.pop(rid, None) is not None:
            # the link went between the check above and now, after the reader failed the rest
            raise EngineStopped(f"the engine has stopped: {self.error or 'shutting down'}")
        self._send(("submit", rid, prompt_ids, params, prep_seconds))
        return _Abort(self, rid)

    def request_ended(self, finish_reason: str, cached_tokens: int) -> None:
        self._send(("ended", finish_reason, cached_tokens))

    async def metrics_text(self) -> bytes:
        """The engine process's /metrics (its one registry counts every API process's requests);
        still answered after the engine has ended, while its process is there."""
        if self._lost:
            raise EngineStopped(f"the engine has stopped: {self.error}")
        ask = concurrent.futures.Future()
        aid = next(self._ids)
        self._asks[aid] = ask
        self._send(("metrics", aid))
        return await asyncio.wait_for(asyncio.wrap_future(ask), 10)

    def close(self) -> None:
        self._closing = True
        self.conn.close()

    def _send(self, msg: tuple) -> None:
        # A failed send means the link is gone: the reader sees it and fails what is in flight.
        with self._send_lock, contextlib.suppress(OSError, ValueError):
            self.conn.send(msg)

    def _read(self) -> None:
        try:
            while True:
                msg = self.conn.recv()
                if msg[0] == "out":
                    for rid, item in msg[1]:
                        out = wire.decode(rid, item)
                        done = isinstance(out, Exception) or out.finished
                        cb = self._callbacks.pop(rid, None) if done else self._callbacks.get(rid)
                        if cb is None:
                            continue
                        try:
                            cb(out)
                        except Exception:  # e.g. the event loop is closed: only this request is lost
                            log.exception("delivering a result failed")
                            if not done:
                                _Abort(self, rid).set()
                    self._delivered()
                elif msg[0] == "metrics":
                    if (ask := self._asks.pop(msg[1], None)) is not None:
                        ask.set_result(msg[2])
                elif msg[0] == "stopped":
                    self.error, self._stopped = msg[1], True
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("the link to the engine process failed")
        self._stopped = self._lost = True
        self.error = self.error or "the engine process is gone"
        # Swapped out, not iterated in place: the event loop may be adding one right now (it
        # sees _stopped from here on and refuses further requests).
        callbacks, self._callbacks = self._callbacks, {}
        asks, self._asks = self._asks, {}
        for cb in callbacks.values():
            try:
                cb(EngineStopped(f"the engine stopped: {self.error}"))
            except Exception:
                log.exception("delivering a result failed")
        for ask in asks.values():
            ask.set_exception(EngineStopped(self.error))
        self._delivered()
        if not self._closing and self.on_lost is not None:
            self.on_lost()

    def _delivered(self) -> None:
        if self.on_delivered is not None:
            try:
                self.on_delivered()
            except Exception:
                log.exception("the on_delivered hook failed")


@dataclasses.dataclass(frozen=True)
class ApiSpec:
    """What an API process needs (pickled to it by multiprocessing's spawn)."""

    hub_address: str
    authkey: bytes
    model_name: str
    tokenizer: str  # the directory of its tokenizer.json
    api_key: str | None
    shutdown_timeout: float
    http: str  # uvicorn's protocol and loop implementations (server/cli.py http_stack)
    loop: str


def api_main(spec: ApiSpec, sock: socket.socket, index: int) -> None:
    """An API process: serve the routes on the inherited listening socket until SIGTERM, or
    until the engine process is gone."""
    import uvicorn

    from model_host.server.app import create_app
    from model_host.tokenizer import Tokenizer

    # Its own process group: a terminal's Ctrl-C reaches only the engine process, which stops
    # the API processes with one SIGTERM each (a second signal would make uvicorn skip the
    # graceful shutdown).
    os.setpgid(0, 0)
    logging.basicConfig(format=f"model-host[api {index}]: %(message)s")
    gone = threading.Event()
    servers: list[uvicorn.Server] = []

    def lost() -> None:
        log.error("the engine process is gone; this API process exits")
        gone.set()
        for server in servers:
            server.should_exit = True

    engine = RemoteEngine(spec.hub_address, spec.authkey, on_lost=lost)
    app = create_app(engine, Tokenizer(spec.tokenizer), spec.model_name, spec.api_key)
    servers.append(uvicorn.Server(uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=spec.shutdown_timeout, http=spec.http, loop=spec.loop)))
    try:
        if not gone.is_set():  # the engine may have gone while this process was starting
            servers[0].run(sockets=[sock])
    finally:
        engine.close()
