"""`model-host serve` as a user starts it: a subprocess on a tiny checkpoint (issue 14 items 14, 19)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.openai_stub import free_port


class ServeProcess:
    """`model-host serve` in a subprocess; its output lines are collected as they come."""

    def __init__(self, checkpoint: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "model_host.cli", "serve", "--checkpoint", str(checkpoint), "--port",
             str(self.port), "--kv-memory-gb", "0.02", "--max-model-len", "4096", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while True:
            assert self.proc.poll() is None, "".join(self.lines)
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "model-host did not come up:\n" + "".join(self.lines)
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def test_serve_logs_model_device_capacity_and_url_at_startup(tiny_checkpoint):
    """Without -v, a newcomer sees what was loaded, where, how much fits and where to connect."""
    p = ServeProcess(tiny_checkpoint)
    try:
        p.wait_healthy()
        out = "".join(p.lines)
        assert "tiny-v3" in out and "device cpu" in out, out
        assert "KV cache holds" in out and " tokens" in out, out
        assert f"http://127.0.0.1:{p.port}/v1" in out, out
        # The C HTTP parser and libuv loop are dependencies: the HTTP thread's CPU per streamed
        # event, which it shares with the engine under the GIL, is ~30% lower than h11's on asyncio.
        assert "HTTP: httptools on uvloop" in out, out
    finally:
        p.close()


def test_serve_exits_promptly_on_sigterm_with_a_request_in_flight(tiny_checkpoint):
    p = ServeProcess(tiny_checkpoint)
    try:
        p.wait_healthy()
        body = {"model": "tiny-v3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000,
                "ignore_eos": True}
        def request() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the server cuts it off when it exits
                httpx.post(f"{p.url}/v1/chat/completions", json=body, timeout=60)

        client = threading.Thread(target=request, daemon=True)
        client.start()
        deadline = time.time() + 30
        while "model_host_requests_running 1.0" not in httpx.get(f"{p.url}/metrics").text:
            assert time.time() < deadline, "the request never started"
            time.sleep(0.1)
        t0 = time.perf_counter()
        p.proc.send_signal(signal.SIGTERM)
        try:
            rc = p.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("model-host serve was still running 10 s after SIGTERM")
        took = time.perf_counter() - t0
        # uvicorn re-raises the signal after its shutdown, so the exit status says SIGTERM.
        assert rc in (0, -signal.SIGTERM) and took < 10, (rc, took)
    finally:
        p.close()


SERVE_AND_REPORT = """
import os, signal, sys, threading, httpx
from model_host.cli import build_parser
from model_host.server.cli import build, serve
args = build_parser().parse_args(sys.argv[1:])
served = build(args)

def probe():
    url = f"http://127.0.0.1:{args.port}"
    while True:
        try:
            r = httpx.post(url + "/v1/completions", json={"model": served.model_name, "prompt": "hi", "max_tokens": 2},
                           timeout=30)
            break
        except httpx.HTTPError:
            pass
    print("status", r.status_code, "engine on main thread", served.loop.thread is threading.main_thread(), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=probe, daemon=True).start()
sys.exit(serve(served, args))
"""


def test_serve_runs_the_engine_on_the_main_thread(tiny_checkpoint):
    """The engine steps on the thread that loaded the model, uvicorn on a side thread: on the CPU,
    torch ops from a second thread ran 2.5-4x slower (one libgomp pool per master thread)."""
    port = free_port()
    out = subprocess.run(
        [sys.executable, "-c", SERVE_AND_REPORT, "serve", "--checkpoint", str(tiny_checkpoint), "--port", str(port),
         "--kv-memory-gb", "0.02", "--max-model-len", "1024"],
        capture_output=True, text=True, timeout=120)
    assert "status 200 engine on main thread True" in out.stdout, out.stdout + out.stderr
    assert out.returncode == -signal.SIGTERM, out.stderr  # ended by the signal, after its cleanup


def test_ctrl_c_stops_serve_without_a_traceback(tiny_checkpoint):
    """Ctrl-C (SIGINT) ends the server quietly, with the signal as its exit status."""
    p = ServeProcess(tiny_checkpoint)
    try:
        p.wait_healthy()
        p.proc.send_signal(signal.SIGINT)
        rc = p.proc.wait(timeout=20)
        p.reader.join(timeout=5)
        assert rc == -signal.SIGINT and "Traceback" not in "".join(p.lines), "".join(p.lines)
    finally:
        p.close()
