"""`make run`, the newcomer's first command, does what the README and the quickstart say (issue 14.4):
ingest docs/, answer QUESTION in the terminal, then start the web UI and print its URL."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(*args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_UI_")}
    res = subprocess.run(["make", "-n", "run", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def step(lines: list[str], pattern: str) -> int:
    hits = [i for i, ln in enumerate(lines) if re.search(pattern, ln)]
    assert len(hits) == 1, f"expected one {pattern!r} step in `make -n run`:\n" + "\n".join(lines)
    return hits[0]


def default_question() -> str:
    m = re.search(r"^QUESTION \?= (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert m, "the Makefile sets no default QUESTION"
    return m.group(1).strip()


def test_make_run_ingests_answers_then_starts_the_ui():
    lines = dry_run("QUESTION=Which port does the UI use?")
    ingest = step(lines, r"/rag-ingest docs/$")
    ask = step(lines, r'/rag-ask "Which port does the UI use\?"$')
    url_line = step(lines, r"^echo .*http://")
    ui = step(lines, r"/rag-ui$")
    assert ingest < ask < url_line < ui
    assert step(dry_run(), r"/rag-ask ") == ask  # without QUESTION: the default question
    assert f'rag-ask "{default_question()}"' in dry_run()[ask]


def test_readme_and_quickstart_say_what_make_run_does():
    printed = subprocess.run(["bash", "-c", dry_run()[step(dry_run(), r"^echo .*http://")]],
                             env={"PATH": os.environ["PATH"]}, capture_output=True, text=True).stdout
    url = re.search(r"http://\S+/", printed).group(0)
    assert url == "http://127.0.0.1:7860/"
    readme = (REPO / "README.md").read_text()
    claim = next(ln for ln in readme.splitlines() if ln.startswith("make run "))
    assert "ingest docs/" in claim and "answer a question" in claim and "web UI" in claim
    # The README's paragraph names the question make asks, the two commands and the URL printed.
    para = " ".join(readme.split("`make run` indexes", 1)[1].split("\n\n", 1)[0].split())
    assert default_question().strip('"') in para.replace("*", "")
    assert "rag-ask" in para and "rag-ui" in para and url in para
    quick = (REPO / "docs" / "quickstart.md").read_text()
    steps = quick.split("`make run` runs", 1)[1].split("\n\n", 3)[1]
    order = [steps.index(s) for s in ("rag-ingest docs/", f'rag-ask "{default_question()}"', "rag-ui", url)]
    assert order == sorted(order), steps
