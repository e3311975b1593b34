"""`python -m ui` as a user starts it: settings, login, and a first run with no collection yet."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AuthenticationError

from rag.config import RagConfig
from rag.settings import SettingsError
from tests.ui.conftest import FIXTURE_DOCS
from tests.ui.process import rag_ui, ui_env
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
        new = MiniLMEmbedder(int8=None, onnx=RagConfig.load({}).embed_onnx).model_id  # int8 (ORT) on the CPU, fp32 on CUDA
        assert embedder_for(RagConfig.load({}, embedder="auto"), store).model_id == new
    finally:
        store.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`rag-ui` with a login, no LLM configured and an empty Milvus Lite db."""
    tmp = tmp_path_factory.mktemp("cli")
    env = ui_env(RAG_UI_USER="alice", RAG_UI_PASSWORD="s3cret")
    with rag_ui("--uri", str(tmp / "milvus.db"), "--data-dir", str(tmp / "data"), cwd=REPO, env=env,
                log=tmp / "ui.log") as url:
        yield url


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


def test_milvus_uri_may_be_a_lite_path(tmp_path):
    """`MILVUS_URI=./data/milvus.db rag-ui` starts exactly like `--uri ./data/milvus.db` (issue 14.1);
    pymilvus used to reject the path at import time with a traceback."""
    env = ui_env(MILVUS_URI="./data/milvus.db")
    with rag_ui(cwd=tmp_path, env=env, log=tmp_path / "ui.log") as url:
        client = Client(url, verbose=False)
        assert client.predict(api_name="/stats") == {"collection": "docs", "exists": False}
        report, *_ = client.predict([handle_file(str(FIXTURE_DOCS / "storage.md"))], "docs", api_name="/ingest")
        assert "**Ingested 1 file** into **docs**: 1 new" in report
    assert (tmp_path / "data" / "milvus.db").is_dir()  # the relative path, from rag-ui's folder
    assert "Traceback" not in (tmp_path / "ui.log").read_text()


@pytest.mark.slow
def test_upload_source_name_does_not_depend_on_the_start_folder(tmp_path):
    """The same upload from rag-ui started in two folders is one source, `uploads/<name>` (issue 14.8):
    the second run finds it unchanged instead of adding a second copy under another name."""
    first, second = tmp_path / "first", tmp_path / "elsewhere" / "second"
    first.mkdir()
    second.mkdir(parents=True)
    db, data = tmp_path / "milvus.db", first / "data"
    note = tmp_path / "notes.md"
    note.write_text("# Notes\n\n## Rotation\n\nThe quokka scheduler rotates its log files every Tuesday.\n")
    runs = [(first, "data"), (second, str(data))]  # a relative data dir, then the same one absolute
    reports, sources = [], []
    for i, (cwd, data_dir) in enumerate(runs):
        with rag_ui("--uri", str(db), "--data-dir", data_dir, cwd=cwd, env=ui_env(), log=tmp_path / f"ui{i}.log") as url:
            client = Client(url, verbose=False, download_files=False)
            report, _, table, _, _ = client.predict([handle_file(str(note))], "docs", api_name="/ingest")
            reports.append(report)
            sources.append([row[0] for row in table["data"]])
    assert "1 new, 0 changed, 0 unchanged" in reports[0]
    assert "0 new, 0 changed, 1 unchanged" in reports[1]
    assert sources == [["uploads/notes.md"], ["uploads/notes.md"]]
    assert (data / "uploads" / "docs" / "notes.md").is_file()
