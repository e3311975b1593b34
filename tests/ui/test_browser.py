"""The UI in a real browser: headless Chromium through Selenium against the launched app.

Skips, with the reason printed, only when Chromium or chromedriver is missing; never passes
silently. Screenshots go to tests/artifacts/ (git-ignored), also on failure.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from rag.llm import LLMClient
from tests.rag_core.conftest import VENV_BIN
from tests.ui import browser
from tests.ui.conftest import ANSWER, FIXTURE_DOCS
from tests.ui.process import rag_ui, ui_env

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
REASON = browser.missing_reason()
# pytest's -ra (in the project's addopts) prints this reason in the summary of every run.
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"browser test skipped: {REASON}")


@pytest.fixture
def driver(request):
    ARTIFACTS.mkdir(exist_ok=True)
    with browser.chrome() as d:
        yield d
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            d.save_screenshot(str(ARTIFACTS / f"failed-{request.node.name}.png"))


def rendered(markdown: str) -> str:
    return markdown.replace("`", "")  # code spans render as <code>, without the backticks


def test_question_streams_answer_and_sources_render(app, driver):
    app.stub.state.delay_s = 0.04  # ~30 words: the answer visibly grows over about a second
    browser.open_app(driver, app.url)
    assert "Docs Q&A" in driver.title
    browser.ask(driver, "How do I back up the index?")

    seen = browser.stream_answer(driver, 0, rendered(ANSWER))
    partial = {n for n in seen if 0 < n < len(rendered(ANSWER))}
    assert len(partial) >= 3, f"the answer did not stream token by token: lengths {seen}"

    text = browser.open_panel(driver, "Sources", "[1]")
    assert "[1] tests/ui/fixtures/docs/storage.md › Storage and backups › Backing up the index" in text
    assert "cited" in text and "similarity 0." in text and "hybrid rank 1" in text
    assert "copy the whole data/milvus.db directory" in " ".join(text.split())  # the snippet, its lines kept
    time.sleep(0.5)  # the panel's open animation
    driver.save_screenshot(str(ARTIFACTS / "ui_chat.png"))


def test_stop_button_ends_the_stream(app, driver, monkeypatch):
    closed: list[float] = []
    stream = LLMClient.stream

    def watched(self, *args, **kwargs):  # notes when the upstream LLM stream is closed
        try:
            yield from stream(self, *args, **kwargs)
        finally:
            closed.append(time.monotonic())

    monkeypatch.setattr(LLMClient, "stream", watched)
    words = " ".join(f"word{i}" for i in range(60))
    app.stub.state.reply = lambda body: words
    app.stub.state.delay_s = 0.15  # 60 words take 9 s unless stopped
    browser.open_app(driver, app.url)
    browser.ask(driver, "How do I back up the index?")
    browser.wait_for("the first words", lambda: (a := browser.answers(driver)) and len(a[0].split()) >= 3)

    driver.find_element("css selector", "#stop").click()
    clicked = time.monotonic()
    # The request to the LLM is closed too, so the server stops generating for nobody.
    browser.wait_for("the LLM stream to close", lambda: closed, timeout=5)
    assert closed[0] - clicked < 3
    time.sleep(0.5)  # let the last in-flight update land
    stopped = browser.answers(driver)[0]
    time.sleep(1.5)
    assert browser.answers(driver)[0] == stopped, "the answer kept growing after Stop"
    assert 3 <= len(stopped.split()) < 60

    # The chat still works after a stop.
    app.stub.state.reply = lambda body: ANSWER
    app.stub.state.delay_s = 0.0
    browser.ask(driver, "How do I back up the index?")
    browser.stream_answer(driver, 1, rendered(ANSWER))


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """`rag-ui` started on a database `rag-ingest` filled before: the second `make run`."""
    tmp = tmp_path_factory.mktemp("restart")
    db = str(tmp / "milvus.db")
    res = subprocess.run([str(VENV_BIN / "rag-ingest"), str(FIXTURE_DOCS), "--uri", db, "--quiet", "--json"],
                         cwd=tmp, env=ui_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    with rag_ui("--uri", db, "--data-dir", str(tmp / "data"), cwd=tmp, env=ui_env(), log=tmp / "ui.log") as url:
        yield url, report


def _tab(driver, label: str) -> None:
    from selenium.webdriver.common.by import By

    tabs = [t for t in driver.find_elements(By.CSS_SELECTOR, "button[role='tab']") if t.text.strip() == label]
    assert tabs, f"no {label!r} tab"
    tabs[0].click()


@pytest.mark.slow
def test_restart_on_a_filled_database_shows_its_rows(restarted, driver):
    """Issue 14.2: after a restart the collection is loaded at start-up, so the sidebar, the banner
    and the Knowledge-base table show the real rows at once, and no raw Milvus text reaches the page."""
    from selenium.webdriver.common.by import By

    url, report = restarted
    files, chunks = report["files_new"], report["chunks_written"]
    assert files == 4 and chunks > files
    browser.open_app(driver, url)
    status = browser.wait_for("the knowledge-base row", lambda: (
        t if "Knowledge base" in (t := driver.find_element(By.ID, "status").text) else None))
    assert f"{files} files, {chunks} chunks" in status, status
    banner = driver.find_element(By.ID, "banner").text
    assert "Retrieval-only mode" in banner and "empty" not in banner and "ingest documents first" not in banner

    _tab(driver, "Knowledge base")
    cells = browser.wait_for("the collection table", lambda: driver.execute_script(
        "return Array.from(document.querySelectorAll('#kb-stats td')).map(e => e.textContent.trim());"))
    assert cells[:3] == ["docs", str(files), str(chunks)], cells
    expected = {"ingest.md", "retrieval.md", "settings.txt", "storage.md"}

    def listed() -> set[str]:
        text = driver.execute_script("return document.querySelector('#kb-sources').innerText;")
        return {Path(t.strip()).name for t in text.splitlines() if t.strip().startswith("/")}

    browser.wait_for(f"the sources table to list {sorted(expected)}", lambda: listed() == expected)
    page = driver.find_element(By.TAG_NAME, "body").text
    for raw in ("MilvusException", "released", "Traceback", "<_InactiveRpcError"):
        assert raw not in page
