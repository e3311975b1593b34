"""The engine as the HTTP layer sees it: `LocalEngine` (the engine loop in this process) or
`RemoteEngine` (model_host/server/remote.py: the engine in another process, over a socket).

The app (model_host/server/app.py) talks only to this interface, so the same routes serve in
the engine's process (one API thread) or in several API processes (`--api-processes N`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from model_host.engine.loop import Callback, EngineLoop
from model_host.sampler import SamplingParams
from model_host.server.metrics import Metrics


class Abort(Protocol):
    def set(self) -> None: ...


class EngineHandle(Protocol):
    max_model_len: int
    # Called after each batch of callbacks (one engine step's outputs): the app's mailboxes
    # hand them to the event loop in one wake-up.
    on_delivered: Callable[[], None] | None

    @property
    def alive(self) -> bool: ...

    @property
    def error(self) -> BaseException | str | None: ...

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Raise RequestError for a request that can never fit."""

    def submit(self, prompt_ids: list[int], params: SamplingParams, callback: Callback,
               prep_seconds: float) -> Abort:
        """Queue a request, `prep_seconds` after the HTTP layer received it (for /metrics); its
        outputs (or one Exception) go to `callback` off the event loop. Raises EngineStopped
        once the engine has ended."""

    def request_ended(self, finish_reason: str, cached_tokens: int) -> None: ...

    async def metrics_text(self) -> bytes: ...


class LocalEngine:
    """An EngineLoop of this process, with the server's metrics on its steps."""

    def __init__(self, loop: EngineLoop):
        self.loop = loop
        self.max_model_len = loop.engine.max_model_len
        self.metrics = Metrics(loop)
        loop.on_step = self.metrics.on_step

    @property
    def on_delivered(self) -> Callable[[], None] | None:
        return self.loop.on_delivered

    @on_delivered.setter
    def on_delivered(self, hook: Callable[[], None] | None) -> None:
        self.loop.on_delivered = hook

    @property
    def alive(self) -> bool:
        return self.loop.alive

    @property
    def error(self) -> BaseException | None:
        return self.loop.error

    def check(self, prompt_len: int, max_tokens: int) -> None:
        self.loop.engine.check(prompt_len, max_tokens)

    def submit(self, prompt_ids: list[int], params: SamplingParams, callback: Callback,
               prep_seconds: float) -> Abort:
        abort = self.loop.submit(prompt_ids, params, callback)
        self.metrics.request_started(len(prompt_ids), prep_seconds)
        return abort

    def request_ended(self, finish_reason: str, cached_tokens: int) -> None:
        self.metrics.request_ended(finish_reason, cached_tokens)

    async def metrics_text(self) -> bytes:
        return self.metrics.render()
