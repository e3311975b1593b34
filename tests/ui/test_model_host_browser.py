"""The chat against our own model host, in a real browser (issue 20.6): `model-host serve` a tiny
random checkpoint, point `rag-ui` at it, and watch tokens arrive one by one, Stop end the
stream, and a citation click open the passage. Random weights write gibberish, so the answer
cites nothing: the click goes to [1] of the Sources panel, which links the same way."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.openai_stub import free_port
from tests.ui import browser
from tests.ui.conftest import ARTIFACTS, FIXTURE_DOCS
from tests.ui.process import rag_ui, ui_env
from tests.ui.test_browser import REASON

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(REASON is not None, reason=f"browser test skipped: {REASON}")]
BIN = Path(sys.executable).parent
REPO = FIXTURE_DOCS.parents[3]
MAX_TOKENS = 400  # long enough that Stop lands mid-answer


@pytest.fixture(scope="module")
def model_host(tmp_path_factory):
    """`model-host make-checkpoint --preset tiny` then `model-host serve` it; yields the /v1 URL."""
    tmp = tmp_path_factory.mktemp("model-host")
    ckpt = tmp / "tiny"
    subprocess.run([str(BIN / "model-host"), "make-checkpoint", "--preset", "tiny", "--out", str(ckpt),
                    "--dtype", "bf16"], check=True, capture_output=True, timeout=300)
    port = free_port()
    log = open(tmp / "serve.log", "w")  # noqa: SIM115  (closed after the server stops)
    server = subprocess.Popen([str(BIN / "model-host"), "serve", "--checkpoint", str(ckpt), "--port", str(port),
                               "--kv-memory-gb", "0.05", "--max-model-len", "4096"],
                              stdout=log, stderr=subprocess.STDOUT, env=ui_env())
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "model-host did not come up:\n" + (tmp / "serve.log").read_text()[-3000:]
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def ui_on_model_host(model_host, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui-local")
    db = str(tmp / "milvus.db")
    res = subprocess.run([str(BIN / "rag-ingest"), str(FIXTURE_DOCS), "--uri", db, "--quiet", "--json"],
                         cwd=REPO, env=ui_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["files_new"] == 4
    env = ui_env(LLM_BASE_URL=model_host, LLM_MAX_TOKENS=str(MAX_TOKENS))
    with rag_ui("--uri", db, "--data-dir", str(tmp / "data"), "--backend", "local", cwd=REPO, env=env,
                log=tmp / "ui.log") as url:
        yield url


def test_tokens_stream_stop_interrupts_and_a_citation_opens(ui_on_model_host, driver):
    browser.open_app(driver, ui_on_model_host)
    browser.wait_for("the model host to show as reachable", lambda: "serves" in driver.find_element(
        "id", "status").text, timeout=30)
    browser.ask(driver, "How do I back up the index?")
    lengths: list[int] = []

    def grown() -> bool:
        texts = browser.answers(driver)
        if texts:
            lengths.append(len(texts[0]))
        return len({n for n in lengths if n > 0}) >= 4

    browser.wait_for("the answer to grow token by token", grown, timeout=120, every=0.02)
    driver.find_element("css selector", "#stop").click()
    time.sleep(1.5)  # the in-flight updates land
    stopped = browser.answers(driver)[0]
    time.sleep(2.0)
    assert browser.answers(driver)[0] == stopped, "the answer kept growing after Stop"
    assert len(stopped.split()) < MAX_TOKENS

    browser.open_panel(driver, "Sources", "[1]")
    links = driver.find_elements("css selector", '#chatbot .thought-group a[href*="#cite:"]')
    assert links, "the Sources panel has no citation links"
    # The panel sits in a scrolled chat box; click it as a user would after scrolling it into view.
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click();", links[0])
    text = browser.passage_panel(driver, "tests/ui/fixtures/docs/")
    assert driver.execute_script("return document.querySelector('#passage mark#cited').innerText.length;") > 20
    assert "›" in text  # the heading path
    time.sleep(0.3)
    driver.save_screenshot(str(ARTIFACTS / "ui_model_host.png"))
