"""The UI in a real browser: headless Chromium through Selenium against the launched app.

Skips, with the reason printed, only when Chromium or chromedriver is missing; never passes
silently. Screenshots go to tests/artifacts/ (git-ignored), also on failure.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rag.llm import LLMClient
from tests.ui import browser
from tests.ui.conftest import ANSWER

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
    assert "cited" in text and "score 0." in text
    assert "copy the whole data/milvus.db directory" in text  # the snippet
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
