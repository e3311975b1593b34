"""`rag-ui` as a user starts it: a subprocess, its log, and a wait for HTTP on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.support.openai_stub import free_port

RAG_UI = Path(sys.executable).parent / "rag-ui"


def ui_env(**extra: str) -> dict[str, str]:
    """No LLM, RAG_* or MILVUS_* settings leak in; this checkout's code is the one that runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "LLM_", "MILVUS_", "DEEPSEEK_"))}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", RAG_UI_WARMUP="0", RAG_UI_STATUS_EVERY="0")
    env.update(extra)
    return env


@contextlib.contextmanager
def rag_ui(*args: str, cwd: Path, env: dict[str, str], log: Path, timeout: float = 120) -> Iterator[str]:
    """Run the `rag-ui` console script with `args` from `cwd`; yield its URL once it answers."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(RAG_UI), "--port", str(port), *args], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"rag-ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    if httpx.get(url, timeout=2).status_code < 500:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"rag-ui did not answer within {timeout:g} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
