"""`python -m ui` as a user starts it: settings, login, and a first run with no collection yet."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AuthenticationError

from rag.config import RagConfig
from rag.settings import SettingsError
from tests.support.openai_stub import free_port
from ui.backends import default_backend, resolve
from ui.config import UIConfig

REPO = Path(__file__).resolve().parents[2]


def test_settings_env_then_flags_and_defaults():
    assert UIConfig.load({}).host == "127.0.0.1"  # never exposed to the network by default
    cfg = UIConfig.load({"RAG_UI_PORT": "8001", "RAG_UI_CONCURRENCY": "8"}, port=9000)
    assert (cfg.port, cfg.concurrency, cfg.auth) == (9000, 8, None)
    assert UIConfig.load({"RAG_UI_USER": "a", "RAG_UI_PASSWORD": "b"}).auth == ("a", "b")
    with pytest.raises(SettingsError, match="both RAG_UI_USER and RAG_UI_PASSWORD"):
        UIConfig.load({"RAG_UI_USER": "a"})
    with pytest.raises(SettingsError, match="RAG_UI_BACKEND"):
        UIConfig.load({"RAG_UI_BACKEND": "gpt"})


@pytest.mark.parametrize(("environ", "expected"), [
    ({"DEEPSEEK_API_KEY": "k", "LLM_BASE_URL": "http://h/v1"}, "deepseek"),
    ({"LLM_BASE_URL": "http://h/v1"}, "local"),
    ({}, "retrieval-only"),
    ({"DEEPSEEK_API_KEY": "k", "RAG_UI_BACKEND": "retrieval-only"}, "retrieval-only"),
])
def test_default_backend(environ, expected):
    assert default_backend(UIConfig.load(environ), RagConfig.load(environ)) == expected


def test_local_backend_key_goes_only_to_its_own_url():
    environ = {"LLM_BASE_URL": "http://gpu-box:8000/v1/", "LLM_API_KEY": "secret"}
    ui, rag = UIConfig.load(environ), RagConfig.load(environ)
    assert resolve("local", ui, rag, "http://gpu-box:8000/v1").api_key == "secret"
    assert resolve("local", ui, rag, "http://elsewhere:9000/v1").api_key == "not-needed"
    assert resolve("local", ui, rag, "ftp://x").problem
    assert resolve("deepseek", ui, rag).problem  # no DEEPSEEK_API_KEY: explained, not attempted


def test_auto_embedder_resolves_for_the_ui(tmp_path):
    from rag.embedder import MiniLMEmbedder
    from rag.store import MilvusStore
    from ui.service import embedder_for

    store = MilvusStore(str(tmp_path / "milvus.db"), "docs")
    try:  # no collection yet: the English default
        assert embedder_for(RagConfig.load({}, embedder="auto"), store).model_id == MiniLMEmbedder.model_id
    finally:
        store.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`python -m ui` with a login, no LLM configured and an empty Milvus Lite db."""
    tmp = tmp_path_factory.mktemp("cli")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPSEEK_API_KEY", "LLM_BASE_URL", "RAG_UI_BACKEND")}
    env.update(RAG_UI_USER="alice", RAG_UI_PASSWORD="s3cret", RAG_UI_WARMUP="0", RAG_UI_STATUS_EVERY="0")
    cmd = [sys.executable, "-m", "ui", "--port", str(port), "--uri", str(tmp / "milvus.db"),
           "--data-dir", str(tmp / "data")]
    log = open(tmp / "ui.log", "w")  # noqa: SIM115  (closed below, after the process ends)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"rag-ui exited with {proc.returncode}:\n{(tmp / 'ui.log').read_text()[-3000:]}")
            try:
                if httpx.get(url, timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"rag-ui did not start:\n{(tmp / 'ui.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_login_required_and_wrong_password_refused(served):
    wrong = httpx.post(served + "login", data={"username": "alice", "password": "wrong"}, timeout=5)
    assert wrong.status_code in (400, 401)
    right = httpx.post(served + "login", data={"username": "alice", "password": "s3cret"}, timeout=5)
    assert right.status_code == 200 and right.json() == {"success": True}
    with pytest.raises((AuthenticationError, ValueError), match="Could not login"):
        Client(served, auth=("alice", "wrong"), verbose=False)
    assert httpx.get(served + "config", timeout=5).status_code == 401  # nothing leaks without a login
    with pytest.raises(Exception):  # noqa: B017  (gradio_client's error type for this varies)
        Client(served, verbose=False)


def test_first_run_without_collection_or_llm(served):
    client = Client(served, auth=("alice", "s3cret"), verbose=False)
    assert client.predict(api_name="/stats") == {"collection": "docs", "exists": False}
    status_html, banner = client.predict(api_name="/status")
    assert "ingest documents first" in banner and "Retrieval-only mode" in banner
    assert "needs DEEPSEEK_API_KEY" in status_html
    messages, _ = client.predict("How do I back up the index?", api_name="/chat")
    assert "ingest documents first" in messages[-1]["content"][0]["text"]
    assert "no language model is configured" in banner
