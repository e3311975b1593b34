"""Chat helpers without a server: both Gradio content shapes, bounded history, source formatting."""

from __future__ import annotations

from rag.types import Hit
from ui.chat import content_text, format_sources, history_pairs, snippet


def test_content_text_accepts_strings_and_block_lists():
    assert content_text("plain") == "plain"
    assert content_text([{"type": "text", "text": "a"}, "b", {"type": "file", "file": {"path": "/x.png"}}]) == "a\nb"
    assert content_text({"text": "one block", "type": "text"}) == "one block"
    assert content_text(None) == ""


def test_history_pairs_skips_panels_and_is_bounded():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "q1"}]},
        {"role": "assistant", "metadata": {"title": "Reasoning"}, "content": "thinking"},
        {"role": "assistant", "content": [{"type": "text", "text": "a1"}], "metadata": None},
        {"role": "assistant", "metadata": {"title": "Sources (2)", "status": "done"}, "content": "[1] ..."},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert history_pairs(messages) == [("q1", "a1"), ("q2", "a2")]
    many = [m for i in range(10) for m in ({"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"})]
    assert history_pairs(many, turns=3) == [("q7", "a7"), ("q8", "a8"), ("q9", "a9")]
    assert history_pairs(None) == []


def test_format_sources_marks_cited_and_escapes_markdown():
    hits = [
        Hit("1", 0.71, "## Setup\nRun `make run` then open <http://x>.", "docs/a.md", "Guide › Setup", 0, similarity=0.71),
        Hit("2", 0.40, "# Title\n[link](javascript:alert(1)) *bold*", "docs/b.md", "", 0, similarity=0.40),
    ]
    md = format_sources(hits, "Use make [1].")
    first, second = md.split("\n\n")
    assert first.startswith("**[1]** `docs/a.md` › Guide › Setup — score 0.710 · **cited**")
    assert "`make run`" in first and "Setup\nRun" not in first  # heading lines dropped, code kept
    assert "**cited**" not in second
    assert "\\[link\\]\\(javascript:alert\\(1\\)\\) \\*bold\\*" in second  # inert text, no link


def test_snippet_is_short_and_never_ends_inside_code():
    text = "word " * 40 + "`a very long code span that crosses the limit` tail"
    s = snippet(text, limit=220)
    assert s.endswith(" …") and s.count("`") % 2 == 0 and len(s) <= 222
