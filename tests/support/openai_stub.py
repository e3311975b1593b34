"""A real OpenAI-protocol HTTP server on 127.0.0.1 that stands in for the DeepSeek API in tests.

It speaks the wire protocol the `openai` SDK uses (JSON and SSE streaming), records every
request, and answers from a script: a fixed reply, or a function of the request. The reply
can carry DeepSeek-style `reasoning_content` deltas.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

Reply = str | Callable[[dict[str, Any]], str]


@dataclasses.dataclass
class StubState:
    reply: Reply = "Milvus stores data in object storage [1]."
    reasoning: str | None = None
    model: str = "deepseek-chat"
    api_key: str | None = None  # when set, requests must carry it as a Bearer token
    delay_s: float = 0.0  # per streamed chunk, to test stop buttons and cancellation
    requests: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]


def make_app(state: StubState) -> FastAPI:
    app = FastAPI()

    def unauthorized(request: Request) -> JSONResponse | None:
        if state.api_key and request.headers.get("authorization") != f"Bearer {state.api_key}":
            return JSONResponse({"error": {"message": "invalid api key", "type": "authentication_error"}}, 401)
        return None

    @app.get("/v1/models")
    async def models(request: Request):
        if (err := unauthorized(request)) is not None:
            return err
        return {"object": "list", "data": [{"id": state.model, "object": "model", "owned_by": "stub"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if (err := unauthorized(request)) is not None:
            return err
        body = await request.json()
        state.requests.append(body)
        text = state.reply(body) if callable(state.reply) else state.reply
        created = int(time.time())
        usage = {"prompt_tokens": 42, "completion_tokens": len(text.split()), "total_tokens": 42 + len(text.split())}
        if not body.get("stream"):
            msg: dict[str, Any] = {"role": "assistant", "content": text}
            if state.reasoning:
                msg["reasoning_content"] = state.reasoning
            return {"id": "stub-1", "object": "chat.completion", "created": created, "model": body["model"],
                    "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}], "usage": usage}

        async def events():
            import asyncio

            def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
                payload = {"id": "stub-1", "object": "chat.completion.chunk", "created": created,
                           "model": body["model"], "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                           **extra}
                return f"data: {json.dumps(payload)}\n\n"

            yield chunk({"role": "assistant", "content": ""})
            for piece in _pieces(state.reasoning or "") if state.reasoning else []:
                yield chunk({"reasoning_content": piece})
                await asyncio.sleep(state.delay_s)
            for piece in _pieces(text):
                yield chunk({"content": piece})
                await asyncio.sleep(state.delay_s)
            yield chunk({}, "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({'id': 'stub-1', 'object': 'chat.completion.chunk', 'created': created, 'model': body['model'], 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpenAIStub:
    """Run the stub in a background thread: `with OpenAIStub() as stub: stub.base_url`."""

    def __init__(self, **state: Any):
        self.state = StubState(**state)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(make_app(self.state), host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> OpenAIStub:
        self._thread.start()
        deadline = time.time() + 10
        while not self._server.started:
            if time.time() > deadline:
                raise RuntimeError("OpenAI stub did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
