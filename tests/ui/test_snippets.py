"""Source snippets render as safe markdown: formatting and code intact, HTML inert (issue 14.7).

Rendered with markdown-it (CommonMark, as Gradio's renderer follows it) so the test checks what
a reader sees, not the markdown string."""

from __future__ import annotations

from markdown_it import MarkdownIt

from rag.types import Hit
from ui.chat import format_sources
from ui.snippets import snippet_markdown

PASSAGE = """# Backups

Stop **every** process first, then copy `data/milvus.db`. A stray ` backtick stays a backtick.
<script>alert("x")</script> and <img src=x onerror=alert(1)> are text, ![pixel](http://evil/p.png) too.

```bash
cp -r data/milvus.db backup/   # keeps <angle brackets> and **stars** as written
```

Setext trap
---
"""


def render(md: str) -> str:
    return MarkdownIt("commonmark").render(md)


def test_code_fences_bold_and_code_spans_survive():
    html = render(snippet_markdown(PASSAGE))
    assert "<strong>every</strong>" in html
    assert "<code>data/milvus.db</code>" in html
    assert '<pre><code class="language-bash">cp -r data/milvus.db backup/   # keeps &lt;angle brackets&gt; and **stars** as written\n</code></pre>' in html
    assert "A stray ` backtick stays a backtick." in html  # literal, and it opens no code span
    assert "<h1>" not in html and "<h2>" not in html  # neither the heading nor the setext trap


def test_html_links_and_images_stay_text():
    html = render(snippet_markdown(PASSAGE))
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "![pixel](http://evil/p.png)" in html  # shown, never fetched


def test_a_cut_closes_an_open_fence_and_keeps_the_panel_intact():
    text = "Intro line.\n\n```python\n" + "\n".join(f"x{i} = {i}" for i in range(40)) + "\n```\nAfter the code.\n"
    md = snippet_markdown(text, max_chars=120)
    assert md.endswith("```\n…")  # the fence is closed before the ellipsis
    hits = [Hit("1", 0.5, text, "a.md", "", 0, similarity=0.5, rank=1, mode="dense"),
            Hit("2", 0.4, "Second passage.", "b.md", "", 0, similarity=0.4, rank=2, mode="dense")]
    html = render(format_sources(hits))
    assert html.count("<pre>") == 1 and "Second passage." in html.split("</pre>")[-1]  # [2] is not swallowed
    assert "<code>b.md</code>" in html
