"""Chat helpers without a server: both Gradio content shapes, bounded history, source formatting."""

from __future__ import annotations

from rag.types import Hit
from ui.chat import content_text, format_sources, history_pairs


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


def test_format_sources_marks_cited_and_labels_similarity_and_rank():
    """Issue 14.6: the similarity and the mode's rank, labelled; never the fused RRF score."""
    hits = [
        Hit("1", 0.0909, "## Setup\nRun `make run` then open <http://x>.", "docs/a.md", "Guide › Setup", 0,
            similarity=0.728, rank=1, mode="hybrid"),
        Hit("2", 7.25, "# Title\n[link](javascript:alert(1)) *bold*", "docs/b.md", "", 0, rank=2, mode="bm25"),
    ]
    md = format_sources(hits, "Use make [1].")
    first, second = md.split("\n\n")
    assert first.startswith("**[1]** `docs/a.md` › Guide › Setup — similarity 0.728, hybrid rank 1 · **cited**")
    assert "0.091" not in md and "0.0909" not in md  # the fused score is not shown
    assert second.startswith("**[2]** `docs/b.md` — BM25 score 7.25, bm25 rank 2\n")
    assert "`make run`" in first and "Setup\nRun" not in first  # heading lines dropped, code kept
    assert "&lt;http://x&gt;" in first  # an autolink stays text
    assert "**cited**" not in second
    assert "\\[link\\](javascript:alert(1))" in second and "*bold*" in second  # no link; emphasis kept


def test_cli_citation_labels_similarity_and_rank():
    hit = Hit("1", 0.168, "text", "docs/a.md", "A › B", 0, similarity=0.728, rank=3, mode="hybrid")
    assert hit.citation(2) == "[2] docs/a.md › A › B (similarity 0.728, hybrid rank 3)"
