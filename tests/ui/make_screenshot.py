"""Make the README screenshots (docs/images/ui*.png) with the same browser code as the tests.

    .venv/bin/python -m tests.ui.make_screenshot [--out-dir docs/images]

One picture per view: ui.png (a cited answer with its Sources), ui_citation.png (a citation
opened in the side panel), ui_kb.png (the knowledge base: collection, files, one file's chunks).

Everything is local and scripted, so the picture is the same on every run: the fixture docs
are ingested into a throw-away Milvus Lite db, and an OpenAI-protocol stub stands in for the
DeepSeek API with a fixed answer. The app, the embedder and the browser are the real ones.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.support.openai_stub import OpenAIStub, free_port
from tests.ui import browser
from tests.ui.conftest import FIXTURE_DOCS, launched

REPO = Path(__file__).resolve().parents[2]
QUESTION = "How do I back up the index?"
ANSWER = (
    "Stop every process that uses the index, `rag-ui` included, then copy the whole `data/milvus.db` "
    "directory [1]. Milvus Lite lets only one process open a database at a time, which is why the UI "
    "has to be stopped first [2].\n\n"
    "To restore, put the copy back at the same path. The markdown files stay the source of truth: "
    "`rag-ingest docs/ --recreate` rebuilds the index from scratch [1]."
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=str(REPO / "docs" / "images"), help="folder for the PNGs")
    p.add_argument("--width", type=int, default=1440)
    p.add_argument("--height", type=int, default=900)
    args = p.parse_args(argv)
    if reason := browser.missing_reason():
        print(f"make_screenshot: {reason}", file=sys.stderr)
        return 2
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from ingest.config import IngestConfig
    from rag.config import RagConfig
    from ui.config import UIConfig
    from ui.service import KnowledgeBase

    with tempfile.TemporaryDirectory(prefix="rag-ui-shot-") as tmp, OpenAIStub(reply=ANSWER, delay_s=0.01) as stub:
        # Work inside the temp dir so sources read "docs/storage.md", as in a real checkout.
        os.chdir(tmp)
        shutil.copytree(FIXTURE_DOCS, "docs")
        rag = RagConfig.load({"DEEPSEEK_API_KEY": "sk-demo"}, milvus_uri="data/milvus.db")
        ui = UIConfig.load({}, port=free_port(), data_dir="data", deepseek_base_url=stub.base_url,
                           status_every=0.0, warm_up=False)
        kb = KnowledgeBase(rag, IngestConfig.load({}))
        try:
            print(kb.ingest(["docs"], rag.collection).summary())
            with launched(kb, ui) as url, browser.chrome(args.width, args.height) as driver:
                browser.open_app(driver, url)
                browser.ask(driver, QUESTION)
                browser.wait_for("the whole answer", lambda: any("from scratch [1]." in a for a in browser.answers(driver)))
                browser.open_panel(driver, "Sources", "[2]")
                driver.execute_script("document.activeElement && document.activeElement.blur()")
                time.sleep(0.5)  # let the panel's open animation finish
                driver.save_screenshot(str(out / "ui.png"))
                browser.click_citation(driver, 1)
                browser.passage_panel(driver, "Backing up the index")
                time.sleep(0.5)
                driver.save_screenshot(str(out / "ui_citation.png"))
                _kb_view(driver)
                driver.save_screenshot(str(out / "ui_kb.png"))
        finally:
            kb.close()
            os.chdir(REPO)
    print(f"wrote ui.png, ui_citation.png and ui_kb.png in {out}")
    return 0


def _kb_view(driver) -> None:
    """The Knowledge base tab with docs/storage.md chosen and its chunks listed."""
    from selenium.webdriver.common.by import By

    [tab] = [t for t in driver.find_elements(By.CSS_SELECTOR, "button[role='tab']") if t.text.strip() == "Knowledge base"]
    tab.click()
    browser.wait_for("the files table", lambda: "docs/storage.md" in driver.find_element(By.ID, "kb-sources").text)

    def options() -> list:
        found = [o for o in driver.find_elements(By.CSS_SELECTOR, "#kb-file li, ul.options li")
                 if o.text.strip() == "docs/storage.md"]
        if not found:  # the list opens with the choices it has; open it again until they arrived
            driver.find_element(By.ID, "kb-stats").click()
            driver.find_element(By.CSS_SELECTOR, "#kb-file input").click()
            time.sleep(0.3)
        return found

    option = browser.wait_for("the file choice", options)
    option[0].click()
    driver.find_element(By.ID, "browse-chunks").click()
    browser.wait_for("the chunks", lambda: "Backing up the index" in driver.find_element(By.ID, "kb-chunks").text)
    driver.execute_script("document.activeElement && document.activeElement.blur();"
                          "document.getElementById('kb-sources').scrollIntoView({block: 'start'});")
    time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
