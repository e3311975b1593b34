"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

Every bad request gets an OpenAI-style error body with a 4xx status; the engine runs on its own
thread (or in its own process: the app sees it through model_host/server/handle.py), and a
client that disconnects mid-stream (or calls /v1/abort) frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from model_host.engine.engine import RequestError
from model_host.engine.loop import EngineStopped
from model_host.engine.outputs import StepOutput, TokenLogprob
from model_host.server.handle import EngineHandle
from model_host.server.mailbox import Mailboxes
from model_host.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from model_host.tokenizer import Tokenizer

MAX_BODY_BYTES = 4 * 2**20
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there
TEXT_SLOT = "\ue000"  # a private-use character: where a streamed event's text goes in its template
log = logging.getLogger(__name__)


class AbortRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    id: str


class _Request:
    """One in-flight generation: its queue of step outputs and its abort switch."""

    def __init__(self, rid: str, prompt_len: int):
        self.id = rid
        self.prompt_len = prompt_len
        self.queue: asyncio.Queue[StepOutput | Exception] = asyncio.Queue()
        self.abort: Any = None
        self.done = False
        self.cached_tokens = 0  # prompt tokens the prefix cache served, once it finished
        self.polled = time.monotonic()  # last check that a non-streaming client is still there

    def usage(self, out: StepOutput) -> dict[str, Any]:
        seq = out.seq
        return {"prompt_tokens": self.prompt_len, "completion_tokens": seq.num_output,
                "total_tokens": self.prompt_len + seq.num_output,
                "prompt_tokens_details": {"cached_tokens": seq.prompt_cached_tokens}}


def create_app(engine: EngineHandle, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app over a started (or to-be-started) engine."""
    app = FastAPI(title="model-host", version="1")
    inflight: dict[str, _Request] = {}
    mailboxes = Mailboxes()
    engine.on_delivered = mailboxes.flush

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(404)
    async def _not_found(request: Request, _e: Exception) -> JSONResponse:
        return JSONResponse(APIError(404, f"no route {request.method} {request.url.path}").body(), 404)

    @app.exception_handler(405)
    async def _bad_method(request: Request, _e: Exception) -> JSONResponse:
        return JSONResponse(APIError(405, f"method {request.method} not allowed on {request.url.path}").body(), 405)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return JSONResponse(APIError(500, "internal server error; see the server log", type="server_error").body(),
                            500)

    def authorize(request: Request) -> None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key")

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        """Authorize, read at most max_body_bytes, and validate the JSON body into `model`."""
        authorize(request)
        if int(request.headers.get("content-length") or 0) > max_body_bytes:
            raise APIError(413, f"request body over {max_body_bytes} bytes")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_body_bytes:
                raise APIError(413, f"request body over {max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}") from None
        except RecursionError:
            raise APIError(400, "malformed JSON body: nested too deeply") from None
        try:
            return model.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or "body"
            raise APIError(400, f"{param}: {err['msg']}", param=param) from None

    async def parse_generation(request: Request, model: type[BaseModel]) -> Any:
        req = await parse(request, model)
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return req

    def unavailable() -> APIError:
        return APIError(503, f"the engine has stopped ({engine.error or 'shutting down'}); see the server log",
                        type="server_error", code="engine_stopped")

    def start(prompt_ids: list[int], req: Any, prefix: str, received: float) -> _Request:
        params = req.sampling(len(prompt_ids), engine.max_model_len)
        try:
            engine.check(len(prompt_ids), params.max_tokens)
        except RequestError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        if not engine.alive:
            raise unavailable()
        r = _Request(f"{prefix}-{uuid.uuid4().hex[:24]}", len(prompt_ids))
        aio = asyncio.get_running_loop()
        box = mailboxes.for_loop(aio)
        try:
            r.abort = engine.submit(prompt_ids, params, lambda out: box.post(r.queue, out),
                                    time.perf_counter() - received)
        except EngineStopped:
            raise unavailable() from None
        inflight[r.id] = r
        return r

    async def next_output(r: _Request, request: Request | None) -> StepOutput | Exception | None:
        """The request's next output; None once `request`'s client has disconnected."""
        if request is None:  # streaming: Starlette cancels the response when the client leaves
            return await r.queue.get()
        # Checked by the clock, not only when the queue runs dry: a fast engine keeps the queue
        # full, and a client that left would then never be noticed (seen under CI load).
        while True:
            try:
                out = await asyncio.wait_for(r.queue.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                out = None
            now = time.monotonic()
            if now - r.polled >= DISCONNECT_POLL_S:
                r.polled = now
                if await request.is_disconnected():
                    return None
            if out is not None:
                return out

    async def outputs(r: _Request, request: Request | None = None) -> AsyncIterator[list[StepOutput]]:
        """Step outputs until the request finishes, in batches: everything queued when the reader
        asks (one output while the reader keeps up, several once it falls behind the engine, so
        a stream then sends one event for several tokens). With `request`, a client that
        disconnects (non-streaming) ends it; a streaming one ends it by closing this generator."""
        reason = "abort"
        try:
            while True:
                out = await next_output(r, request)
                if out is None:
                    return
                batch = [out]
                while not (isinstance(batch[-1], Exception) or batch[-1].finished) and not r.queue.empty():
                    batch.append(r.queue.get_nowait())
                good: list[StepOutput] = []  # what the client gets before an error ends the request
                for out in batch:
                    error = None
                    if isinstance(out, Exception):
                        r.done, reason = True, "error"
                        error = (APIError(503, f"{out}; see the server log", type="server_error", code="engine_stopped")
                                 if isinstance(out, EngineStopped) else
                                 APIError(500, f"the engine failed on this request ({out}); see the server log",
                                          type="server_error"))
                    elif out.finished:
                        r.done, reason = True, out.seq.finish_reason or "stop"
                        r.cached_tokens = out.seq.prompt_cached_tokens
                        if reason == "error":
                            error = APIError(500, "the engine failed on this request; see the server log",
                                             type="server_error")
                    if error is not None:
                        if good:
                            yield good
                        raise error
                    good.append(out)
                yield good
                if good[-1].finished:
                    return
        finally:
            inflight.pop(r.id, None)
            engine.request_ended(reason, r.cached_tokens)
            if not r.done:
                r.abort.set()  # client went away (or we failed): free the blocks now

    def token_text(tok: int) -> str:
        return tokenizer.decode([tok])

    def chat_logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
        def entry(tok: int, lp: float) -> dict[str, Any]:
            text = token_text(tok)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                            for t in lps]}

    def completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens = [token_text(t.token) for t in lps]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [t.logprob for t in lps],
                "top_logprobs": [{token_text(i): v for i, v in t.top} for t in lps], "text_offset": offsets}

    async def respond(r: _Request, request: Request, stream: bool, include_usage: bool, chat: bool,
                      logprobs: bool) -> Response:
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        sent_chars = 0  # text_offset of the next completion token

        def choice(text: str, finish: str | None, lps: list[TokenLogprob]) -> dict[str, Any]:
            nonlocal sent_chars
            if chat:
                lp = chat_logprobs(lps) if logprobs else None
                return {"index": 0, "delta" if stream else "message":
                        ({"content": text} if stream else {"role": "assistant", "content": text}),
                        "logprobs": lp, "finish_reason": finish}
            lp = None
            if logprobs:
                lp = completion_logprobs(lps, sent_chars)
                sent_chars += len(text)
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": lp}

        if not stream:
            text, lps, last = [], [], None
            async for batch in outputs(r, request):
                for out in batch:
                    text.append(out.text)
                    lps += [out.logprob] if out.logprob else []
                    last = out
            if last is None:  # the client disconnected: nobody to answer
                return Response(status_code=499)
            return JSONResponse({"id": r.id, "object": obj, "created": created, "model": model_name,
                                 "choices": [choice("".join(text), last.seq.finish_reason, lps)],
                                 "usage": r.usage(last)})

        def sse(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            base = {"id": r.id, "object": obj + ".chunk" if chat else obj, "created": created, "model": model_name}
            if chat:
                yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None}]})
            # A text event without logprobs (nearly every event of a stream) is one template with
            # the text spliced in, serialized once per request instead of once per event (json of
            # the whole chunk was ~12% of the HTTP thread's GIL time at concurrency 128).
            if not logprobs:
                head, _, tail = sse({**base, "choices": [choice(TEXT_SLOT, None, [])]}).rpartition(
                    json.dumps(TEXT_SLOT, ensure_ascii=False))
            gen = outputs(r)
            try:
                async for batch in gen:
                    text, lps, out = "".join(o.text for o in batch), [o.logprob for o in batch if o.logprob], batch[-1]
                    if logprobs and (text or lps):
                        yield sse({**base, "choices": [choice(text, None, lps)]})
                    elif text:
                        yield head + json.dumps(text, ensure_ascii=False) + tail
                    if out.finished:
                        yield sse({**base, "choices": [choice("", out.seq.finish_reason, [])]})
                        if include_usage:
                            yield sse({**base, "choices": [], "usage": r.usage(out)})
            except APIError as e:
                yield sse(e.body())
            finally:
                # A disconnect cancels this generator at a `yield`, where `gen` is suspended:
                # close it now (it aborts the request) rather than at garbage collection.
                await gen.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        received = time.perf_counter()
        req: ChatCompletionRequest = await parse_generation(request, ChatCompletionRequest)
        try:  # off the event loop (a 2k-token prompt takes ms; the tokenizer lets the GIL go)
            ids = await asyncio.to_thread(tokenizer.encode_chat,
                                          [{"role": m.role, "content": m.text()} for m in req.messages])
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        r = start(ids, req, "chatcmpl", received)
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await respond(r, request, req.stream, include, chat=True, logprobs=req.logprobs)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        received = time.perf_counter()
        req: CompletionRequest = await parse_generation(request, CompletionRequest)
        if isinstance(req.prompt, str):
            ids = await asyncio.to_thread(tokenizer.encode, req.prompt, add_bos=True)
        else:
            ids = list(req.prompt)
            if any(not 0 <= t < tokenizer.vocab_size for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
        r = start(ids, req, "cmpl", received)
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await respond(r, request, req.stream, include, chat=False, logprobs=req.logprobs is not None)

    @app.post("/v1/abort")
    async def abort(request: Request) -> dict[str, Any]:
        """Explicit cancel by response id (the `id` of a completion or its stream chunks)."""
        rid = (await parse(request, AbortRequest)).id
        r = inflight.get(rid)
        if r is None:
            raise APIError(404, f"no request {rid!r} in flight", param="id")
        r.abort.set()
        return {"id": rid, "aborted": True}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": "model-host",
            "max_model_len": engine.max_model_len,
        }]}

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine thread runs; 503 once it has died (or stopped), so an orchestrator
        restarts the server instead of sending it requests that would hang."""
        if not engine.alive:
            return JSONResponse({"status": "error", "error": str(engine.error or "the engine is not running")},
                                status_code=503)
        return JSONResponse({"status": "ok", "model": model_name})

    @app.get("/metrics")
    async def prometheus() -> Response:
        try:
            text = await engine.metrics_text()
        except EngineStopped:  # an API process whose engine process has stopped
            raise unavailable() from None
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app
