"""Headless Chromium driven by Selenium, shared by the browser tests and make_screenshot.py.

Chromium and chromedriver come from Debian (`tests/ui/install_chromium.sh`). Each run gets a
fresh profile directory and flags that keep the browser from calling home, so a run is
reproducible and works offline.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--hide-scrollbars", "--force-color-profile=srgb",  # steadier screenshots
]
T = TypeVar("T")

# JS run in the page: the chat's answer texts and its collapsible panels (Reasoning, Sources).
_ANSWERS_JS = """
return Array.from(document.querySelectorAll('#chatbot [data-testid="bot"]'))
  .filter(e => !e.querySelector('.thought-group'))
  .map(e => e.innerText.trim());
"""
_PANEL_JS = """
const groups = Array.from(document.querySelectorAll('#chatbot .thought-group'));
const g = groups.reverse().find(g => g.querySelector('.title').innerText.trim().startsWith(arguments[0]));
return g ? g.innerText : null;
"""
_CLICK_PANEL_JS = """
const groups = Array.from(document.querySelectorAll('#chatbot .thought-group'));
const g = groups.reverse().find(g => g.querySelector('.title').innerText.trim().startsWith(arguments[0]));
if (!g) return false;
g.querySelector('.title').click();
return true;
"""


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing_reason() -> str | None:
    """Why the browser cannot run here, or None when it can."""
    if chromium_binary() is None:
        return "chromium is not installed (run tests/ui/install_chromium.sh as root)"
    if not Path(CHROMEDRIVER).exists():
        return f"{CHROMEDRIVER} is missing (run tests/ui/install_chromium.sh as root)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@contextlib.contextmanager
def chrome(width: int = 1440, height: int = 960) -> Iterator[Any]:
    """A headless Chromium with a fresh profile and an exact viewport of width x height."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium_binary() or "chromium"
        for flag in [*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            # --window-size includes the (invisible) window frame; pin the page's viewport itself.
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                   {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
            yield driver
        finally:
            driver.quit()


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 30.0, every: float = 0.05) -> T:
    """Poll `fn` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def open_app(driver: Any, url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait_for("the question box", lambda: driver.find_elements(By.CSS_SELECTOR, "#question textarea"), 60)
    # The status panel fills in from the first server round trip: the app is live.
    wait_for("the status panel", lambda: "status-row" in driver.find_element(By.ID, "status").get_attribute("innerHTML"))


def ask(driver: Any, question: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.CSS_SELECTOR, "#question textarea")
    box.clear()
    box.send_keys(question)
    driver.find_element(By.CSS_SELECTOR, "#send").click()


def answers(driver: Any) -> list[str]:
    return driver.execute_script(_ANSWERS_JS)


def panel_text(driver: Any, title: str) -> str | None:
    return driver.execute_script(_PANEL_JS, title)


def toggle_panel(driver: Any, title: str) -> bool:
    return driver.execute_script(_CLICK_PANEL_JS, title)


def open_panel(driver: Any, title: str, expect: str, timeout: float = 20.0) -> str:
    """Expand the last panel named `title` until its text shows `expect`; return that text.

    Gradio re-creates chat messages on every update of the chat value, and a re-created panel
    starts collapsed again; the last update lands just after the answer completes. So: click,
    then check the panel is still open a moment later, and click again if an update closed it.
    """

    def opened() -> str | None:
        text = panel_text(driver, title) or ""
        if expect not in text:
            toggle_panel(driver, title)
            return None
        time.sleep(0.4)
        text = panel_text(driver, title) or ""
        return text if expect in text else None

    return wait_for(f"the {title} panel to open", opened, timeout, every=0.2)


def stream_answer(driver: Any, count_before: int, final: str, timeout: float = 60.0) -> list[int]:
    """Wait for answer number `count_before + 1` to read `final`; return the lengths seen on the way."""
    seen: list[int] = []

    def done() -> bool:
        texts = answers(driver)
        if len(texts) > count_before:
            seen.append(len(texts[count_before]))
            return texts[count_before] == final
        return False

    wait_for(f"the answer {final[:40]!r}…", done, timeout, every=0.02)
    return seen


def click_citation(driver: Any, n: int) -> None:
    """Click the last answer's [n] link (the page script opens the passage panel)."""
    from selenium.webdriver.common.by import By

    def link() -> Any:
        found = [a for a in driver.find_elements(By.CSS_SELECTOR, '#chatbot a[href*="#cite:"]')
                 if a.text.strip() in (f"[{n}]", str(n))]
        return found[-1] if found else None

    wait_for(f"the [{n}] citation link", link).click()


def passage_panel(driver: Any, expect: str, timeout: float = 20.0) -> str:
    """The citation panel's text once it shows `expect`."""
    from selenium.webdriver.common.by import By

    def text() -> str | None:
        els = driver.find_elements(By.ID, "passage")
        t = els[0].text if els and els[0].is_displayed() else ""
        return t if expect in t else None

    return wait_for(f"the passage panel to show {expect!r}", text, timeout)
