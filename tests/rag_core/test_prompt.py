"""The answer prompt: numbered, attributed blocks under a token budget, and the citation rules."""

from __future__ import annotations

import re

from rag.prompt import SYSTEM_PROMPT, build_prompt, count_tokens
from rag.types import Hit


def hit(n: int, words: int, header: str = "Guide › Install") -> Hit:
    text = f"passage{n} " + " ".join(["vector"] * words)  # ~1 token a word
    return Hit(id=f"id{n}", score=1.0 - n / 100, text=text, source=f"docs/page{n}.md", header_path=header,
               chunk_index=0)


def blocks_of(user: str) -> list[tuple[int, str]]:
    return [(int(m.group(1)), m.group(2)) for m in re.finditer(r"^\[(\d+)\] (.+)$", user, re.M)]


def test_blocks_are_numbered_with_source_and_header_path():
    hits = [hit(1, 20), hit(2, 20, header=""), hit(3, 20)]
    p = build_prompt("How do I install it?", hits, budget_tokens=6000)
    assert [m["role"] for m in p.messages] == ["system", "user"]
    user = p.messages[1]["content"]
    assert blocks_of(user) == [
        (1, "docs/page1.md › Guide › Install"), (2, "docs/page2.md"), (3, "docs/page3.md › Guide › Install"),
    ]
    assert p.hits == hits and p.dropped == 0
    assert user.index("[1]") < user.index(hits[0].text) < user.index("[2]")
    assert "Question: How do I install it?" in user


def test_budget_drops_whole_passages_and_keeps_numbering_contiguous():
    hits = [hit(1, 40), hit(2, 900), hit(3, 40), hit(4, 900), hit(5, 40)]
    budget = 400
    p = build_prompt("q", hits, budget_tokens=budget)
    assert [h.id for h in p.hits] == ["id1", "id3", "id5"] and p.dropped == 2
    user = p.messages[1]["content"]
    assert [n for n, _ in blocks_of(user)] == [1, 2, 3]
    assert [src for _, src in blocks_of(user)][1].startswith("docs/page3.md")
    for h in p.hits:
        assert h.text in user  # kept whole, never cut
    assert "passage2" not in user and "passage4" not in user
    assert p.context_tokens <= budget
    context = user.split("Context passages:\n\n", 1)[1].split("\n\nQuestion:", 1)[0]
    assert count_tokens(context) <= budget


def test_nothing_fits_means_no_passages():
    p = build_prompt("q", [hit(1, 900)], budget_tokens=50)
    assert p.hits == [] and p.dropped == 1


def test_system_prompt_rules():
    rules = SYSTEM_PROMPT.lower()
    assert "only the numbered context" in rules
    assert "cite every claim" in rules and "[1]" in SYSTEM_PROMPT
    assert "do not guess" in rules
    assert "quote commands" in rules
