"""Citations you can open (issue 20.2): each [n] links to its passage, shown in its section
with the file and heading path, and the whole file can be opened, but only a knowledge-base file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rag.types import Hit
from tests.ui import browser
from tests.ui.conftest import ANSWER, ARTIFACTS
from tests.ui.test_browser import REASON
from ui.chat import linkify, unlink
from ui.citations import CitationError, file_html, parse_ref, passage_html, section, source_path


def _hit(i: int, text: str, start: int, heading: str = "Guide › Backups") -> Hit:
    return Hit(f"{i:032x}", 0.0, text, "docs/guide.md", heading, i, {"start": start, "end": start + len(text)})


def test_links_name_the_passage_and_unlink_restores_the_answer():
    hits = [_hit(1, "a", 0), _hit(2, "b", 5)]
    text = "Copy it [1][2]; see [3]."
    linked = linkify(text, "docs", hits)
    assert linked == f"Copy it [[1]](#cite:docs:{hits[0].id})[[2]](#cite:docs:{hits[1].id}); see [3]."
    assert unlink(linked) == text  # what the rewriter and the export see
    assert parse_ref(f"docs:{hits[0].id}") == ("docs", hits[0].id)
    for bad in ("docs", "docs:xyz", "../etc:00ff", "docs:00ff:1"):
        with pytest.raises(CitationError):
            parse_ref(bad)


def test_section_merges_overlapping_chunks_and_marks_the_cited_one():
    chunks = [_hit(0, "Intro text.", 0, "Guide"), _hit(1, "Stop the UI. Then copy", 20),
              _hit(2, "Then copy the folder.", 33), _hit(3, "Restore it.", 60)]
    text, (a, b) = section(chunks, chunks[2])
    assert text == "Stop the UI. Then copy the folder.\n\nRestore it."  # the overlap appears once
    assert text[a:b] == "Then copy the folder."
    html = passage_html(chunks[2], chunks)
    assert '<mark id="cited">Then copy the folder.</mark>' in html and "docs/guide.md" in html
    assert "Guide › Backups" in html and "<script" not in passage_html(_hit(4, "<script>x</script>", 0), [])


def test_only_knowledge_base_text_files_open(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("docs").mkdir()
    Path("docs/guide.md").write_text("# Guide\n\nStop the UI. Then copy the folder.\n")
    Path("secret.env").write_text("KEY=1")
    uploads = tmp_path / "data" / "uploads" / "docs"
    cited = _hit(1, "Then copy the folder.", 22)
    assert '<mark id="cited">Then copy the folder.</mark>' in file_html(cited, [cited], uploads)
    with pytest.raises(CitationError, match="not in the knowledge base"):
        file_html(cited, [], uploads)
    assert source_path("secret.env", uploads) is None  # not a text file the loader ingests
    assert source_path("uploads/../../../docs/guide.md", uploads) is None  # outside the uploads folder
    gone = Hit("f" * 32, 0, "x", "docs/gone.md", "", 0, {})
    with pytest.raises(CitationError, match="not on this server's disk"):
        file_html(gone, [gone], uploads)


def test_citation_api_refuses_a_forged_link(client):
    html = client.predict("docs:" + "0" * 32, api_name="/citation")[0]
    assert "no longer in the knowledge base" in html
    assert "malformed" in client.predict("docs:../../etc/passwd", api_name="/citation_file")


@pytest.mark.skipif(REASON is not None, reason=f"browser test skipped: {REASON}")
def test_clicking_a_citation_opens_the_passage_and_the_whole_file(app, driver):
    browser.open_app(driver, app.url)
    browser.ask(driver, "How do I back up the index?")
    browser.stream_answer(driver, 0, ANSWER.replace("`", ""))
    browser.click_citation(driver, 1)
    text = browser.passage_panel(driver, "storage.md")
    assert "tests/ui/fixtures/docs/storage.md › Storage and backups › Backing up the index" in text
    marked = driver.execute_script("return document.querySelector('#passage mark#cited').innerText;")
    assert "copy the whole" in marked and "data/milvus.db" in marked
    driver.find_element("css selector", "#open-file").click()
    whole = browser.passage_panel(driver, "the whole file")
    assert "# Storage and backups" in whole  # the file's own heading line, outside any passage
    time.sleep(0.3)
    driver.save_screenshot(str(ARTIFACTS / "ui_citation.png"))
