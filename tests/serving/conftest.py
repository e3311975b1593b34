"""A tiny random DeepSeek-V3 checkpoint served for real on 127.0.0.1 (uvicorn in a thread).

The `serve` fixture's app reaches the engine either in-process (`LocalEngine`, the default) or
over the socket an API process uses (`RemoteEngine` through an `EngineHub`, both in this
process): a test module parametrizes it with ``indirect=True`` over ``HANDLES``.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import uvicorn

from model_host.checkpoint import make_config, write_random_checkpoint
from model_host.engine.engine import Engine, EngineConfig
from model_host.engine.loop import EngineLoop
from model_host.loader import load_model
from model_host.server.app import create_app
from model_host.server.handle import LocalEngine
from model_host.server.hub import EngineHub
from model_host.server.metrics import Metrics
from model_host.server.remote import RemoteEngine
from model_host.tokenizer import Tokenizer
from tests.support.openai_stub import free_port

MODEL = "tiny-v3"
HANDLES = ["thread", "api-process"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / MODEL
    write_random_checkpoint(out, make_config("tiny", mtp=False), dtype="bf16", seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, dtype=torch.float32), Tokenizer(tiny_checkpoint)


class Served:
    """A running server: base_url, the engine loop, and a stop() for teardown."""

    def __init__(self, model, tokenizer, engine_config: EngineConfig, api_key: str | None = None,
                 max_body_bytes: int | None = None, drafter=None, handle: str = "thread"):
        self.engine = Engine(model, tokenizer, engine_config, drafter=drafter)
        self.loop = EngineLoop(self.engine)
        kw = {"max_body_bytes": max_body_bytes} if max_body_bytes else {}
        self.hub = self.remote = None
        if handle == "thread":
            engine = LocalEngine(self.loop)
        else:  # what an API process runs, with the engine process's hub in this process
            self.tmp = tempfile.TemporaryDirectory()
            metrics = Metrics(self.loop)
            self.loop.on_step = metrics.on_step
            key = os.urandom(16)
            self.hub = EngineHub(self.loop, metrics, os.path.join(self.tmp.name, "engine.sock"), key)
            self.hub.start()
            engine = self.remote = RemoteEngine(self.hub.address, key)
        app = create_app(engine, tokenizer, MODEL, api_key, **kw)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.loop.start()
        self.thread.start()
        deadline = time.time() + 15
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.loop.stop()
        if self.hub is not None:
            self.hub.close()
            self.remote.close()
            self.tmp.cleanup()


@pytest.fixture
def serve(tiny_model, request):
    """Factory: `with serve(max_batch=8) as s:` starts a server with that engine config."""
    model, tok = tiny_model
    handle = getattr(request, "param", "thread")

    def start(api_key: str | None = None, max_body_bytes: int | None = None, **cfg) -> Served:
        cfg.setdefault("kv_memory_gb", 0.02)
        cfg.setdefault("max_model_len", 4096)
        return Served(model, tok, EngineConfig(**cfg), api_key, max_body_bytes, handle=handle)

    return start
