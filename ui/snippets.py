"""Source snippets as safe markdown: the passage's own formatting, none of its HTML.

A passage is markdown from someone's docs. Shown in the Sources panel it should look like it
does there: **bold** bold, code fences as code. It must not inject anything: raw HTML is
escaped (Gradio's sanitizer is a second line, not the first), links and images stay text, headings
and setext underlines do not restructure the panel. A snippet is cut at a line end, and a
fence cut open is closed, so a cut never swallows the rest of the panel into code.
"""

from __future__ import annotations

import html
import re

SNIPPET_CHARS = 400
SNIPPET_LINES = 12
_FENCE_RE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_SETEXT_RE = re.compile(r"^\s{0,3}(=+|-+)\s*$")
_BLOCK_START_RE = re.compile(r"^(\s{0,3})([#>])")


def _prose(line: str) -> str:
    """One line outside code: HTML escaped outside `code spans`, stray backticks made literal."""
    pieces = line.split("`")
    if len(pieces) % 2 == 0:  # an odd number of backticks: the last one opens nothing
        head, _, tail = line.rpartition("`")
        return _prose(head) + "\\`" + _escape_html(tail)
    out = []
    for i, piece in enumerate(pieces):
        # Inside a code span markdown shows text literally; an entity there would show as "&lt;".
        out.append(f"`{piece}`" if i % 2 else _escape_html(piece))
    return "".join(out)


def _escape_html(text: str) -> str:
    # Links and images stay text: a javascript: link could run, an image makes the browser fetch.
    return html.escape(text, quote=False).replace("[", "\\[").replace("]", "\\]")


def _block_safe(line: str) -> str:
    """Keep a line from turning into a heading, quote or setext underline of the panel."""
    if _SETEXT_RE.match(line):
        return "\\" + line.lstrip()
    return _BLOCK_START_RE.sub(r"\1\\\2", line)


def snippet_markdown(text: str, max_chars: int = SNIPPET_CHARS, max_lines: int = SNIPPET_LINES) -> str:
    """The passage's first lines as safe markdown; heading lines (the header path shows them)
    and blank runs are left out."""
    out: list[str] = []
    fence: str | None = None  # the open fence's marker, when inside one
    used = 0
    cut = False
    for raw in text.splitlines():
        line = raw.rstrip()
        marker = _FENCE_RE.match(line)
        if fence is None and not marker and (line.lstrip().startswith("#") or not line.strip()):
            if out and out[-1] and not line.strip():
                out.append("")  # keep paragraph breaks, not runs of them
            continue
        if used + len(line) > max_chars or len(out) >= max_lines:
            if not out:  # one long first line: cut it at a word
                out.append(_prose(line[:max_chars].rsplit(" ", 1)[0]) if fence is None else line[:max_chars])
            cut = True
            break
        used += len(line)
        if marker:
            if fence is None:
                fence = marker.group(1)
            elif marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence):
                fence = None
            out.append(line.strip())
        elif fence is not None:
            out.append(line)  # code stays exactly as written
        else:
            out.append(_block_safe(_prose(line)))
    while out and not out[-1]:
        out.pop()
    if fence is not None:
        out.append(fence)  # close a fence the cut left open
    if cut:
        out.append("…")
    return "\n".join(out)
