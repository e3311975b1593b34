"""Fixtures of the UI tests: one launched app per session (real Milvus Lite, real embedder, stub LLM).

Loading all-MiniLM-L6-v2 and ingesting take most of the time, so the gradio_client tests and the
browser tests share one app. Each test resets the stub's script and request log, and tests that
write use their own collection, so the order of tests does not matter.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from rag.pipeline import REWRITE_PROMPT
from tests.support.openai_stub import OpenAIStub, free_port

FIXTURE_DOCS = Path(__file__).resolve().parent / "fixtures" / "docs"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"  # screenshots (git-ignored)
ANSWER = (
    "Stop every process that uses the index, then copy the whole `data/milvus.db` directory [1]. "
    "Only one process can open a Milvus Lite database at a time, so stop `rag-ui` first [2]."
)
REASONING = "The question is about backups. Passage [1] describes the copy; passage [2] the lock."


@dataclasses.dataclass
class LaunchedApp:
    url: str
    kb: object  # ui.service.KnowledgeBase
    stub: OpenAIStub
    data_dir: Path


def scripted_reply(rewritten: str | None = None, answer: str = ANSWER):
    """Stub reply: `rewritten` for question-rewrite requests, `answer` for everything else."""

    def reply(body: dict) -> str:
        system = body["messages"][0]["content"]
        if system == REWRITE_PROMPT:
            return rewritten or body["messages"][-1]["content"]
        return answer

    return reply


@contextlib.contextmanager
def launched(kb, ui_config) -> Iterator[str]:
    """Serve `build_app(kb, ui_config)` on its port in this process; yield its URL."""
    from ui.app import build_app, launch_kwargs

    demo = build_app(kb, ui_config)
    demo.launch(**launch_kwargs(ui_config), prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{ui_config.port}/"
    finally:
        demo.close()


@pytest.fixture(scope="session")
def ui_app(embedder, tmp_path_factory) -> Iterator[LaunchedApp]:
    """The app with the fixture docs ingested into "docs", answering through the stub as the DeepSeek API."""
    from ingest.config import IngestConfig
    from rag.config import RagConfig
    from ui.config import UIConfig
    from ui.service import KnowledgeBase

    root = tmp_path_factory.mktemp("ui")
    with OpenAIStub() as stub:
        rag = RagConfig.load({"DEEPSEEK_API_KEY": "sk-test"}, milvus_uri=str(root / "milvus.db"))
        ui = UIConfig.load({}, port=free_port(), data_dir=str(root / "data"), deepseek_base_url=stub.base_url,
                           status_every=0.0, warm_up=False)
        kb = KnowledgeBase(rag, IngestConfig.load({}), embedder=embedder)
        kb.ingest([str(FIXTURE_DOCS)], "docs")
        try:
            with launched(kb, ui) as url:
                yield LaunchedApp(url, kb, stub, root / "data")
        finally:
            kb.close()


@pytest.fixture
def app(ui_app: LaunchedApp) -> LaunchedApp:
    """The shared app with a fresh stub script: the standard answer, no reasoning, no delay."""
    st = ui_app.stub.state
    st.reply, st.reasoning, st.delay_s = scripted_reply(), None, 0.0
    st.requests.clear()
    return ui_app


@pytest.fixture
def client(app: LaunchedApp):
    from gradio_client import Client

    return Client(app.url, verbose=False, download_files=False)


@pytest.fixture
def driver(request):
    """A headless Chromium; a failing test leaves a screenshot in tests/artifacts/."""
    from tests.ui import browser

    ARTIFACTS.mkdir(exist_ok=True)
    with browser.chrome() as d:
        yield d
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            d.save_screenshot(str(ARTIFACTS / f"failed-{request.node.name}.png"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Record each test's outcome on its item, so fixtures can save a screenshot of a failure."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep


# Gradio's queue computes ETA statistics with pandas idioms that pandas 3 deprecates; the warnings
# come from inside gradio on every event and say nothing about this code.
_GRADIO_PANDAS_NOISE = [
    "ignore:'future.no_silent_downcasting' is deprecated",
    "ignore:The copy keyword is deprecated",
]


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            for spec in _GRADIO_PANDAS_NOISE:
                item.add_marker(pytest.mark.filterwarnings(spec))
