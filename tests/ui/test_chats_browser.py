"""Saved chats, per-chat settings and feedback in a real browser (issues 20.1, 20.4, 20.5):
the browser keeps its id in localStorage, so after a reload its chats are listed and reopen with
the settings they were asked with; a thumbs-up lands in a QA file that `rag-eval qa` reads."""

from __future__ import annotations

import time

import httpx
import pytest

from evals.datasets import load_qa
from tests.ui import browser
from tests.ui.conftest import ANSWER
from tests.ui.test_browser import REASON

pytestmark = pytest.mark.skipif(REASON is not None, reason=f"browser test skipped: {REASON}")
QUESTION = "How do I back up the index?"


def _click_label(driver, container: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    labels = [lb for lb in driver.find_elements(By.CSS_SELECTOR, f"{container} label") if lb.text.strip() == text]
    assert labels, f"no {text!r} in {container}"
    labels[0].click()


def _mode(driver) -> str:
    return driver.execute_script("return document.querySelector('#mode input:checked').value;")


def _choose_chat(driver, title: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#chats input").click()
    option = browser.wait_for(f"the chat {title!r} in the list", lambda: [
        o for o in driver.find_elements(By.CSS_SELECTOR, "#chats li, ul.options li") if o.text.strip() == title])
    option[0].click()


def test_chat_survives_a_reload_with_its_settings_and_feedback_exports(app, driver, tmp_path):
    from selenium.webdriver.common.by import By

    browser.open_app(driver, app.url)
    _click_label(driver, "#mode", "bm25")
    browser.ask(driver, QUESTION)
    browser.stream_answer(driver, 0, ANSWER.replace("`", ""))
    title = browser.wait_for("the Sources title", lambda: browser.panel_text(driver, "Sources"))
    assert "· bm25" in title.splitlines()[0]  # the settings are shown with the answer they produced

    driver.find_elements(By.CSS_SELECTOR, '#chatbot button[aria-label="Like"]')[-1].click()
    time.sleep(0.5)
    driver.find_element(By.ID, "export-qa").click()
    link = browser.wait_for("the QA file's download link", lambda: driver.find_elements(
        By.CSS_SELECTOR, "#exported a[href*='feedback-qa.jsonl']"))
    qa = tmp_path / "feedback-qa.jsonl"  # downloaded over HTTP, as the browser would
    qa.write_bytes(httpx.get(link[0].get_attribute("href"), timeout=10).content)
    [item] = load_qa(qa)
    assert item.question == QUESTION and len(item.gold) == 1 and item.gold[0].source.endswith("storage.md")
    assert item.gold[0].heading == "Backing up the index" and item.gold[0].span is not None  # [1], the first cited passage

    driver.refresh()  # same browser, same localStorage: its chats come back
    browser.open_app(driver, app.url)
    _click_label(driver, "#mode", "hybrid")
    assert _mode(driver) == "hybrid"
    _choose_chat(driver, QUESTION)
    browser.wait_for("the saved answer", lambda: any("copy the whole" in a for a in browser.answers(driver)))
    browser.wait_for("the chat's own settings", lambda: _mode(driver) == "bm25")
