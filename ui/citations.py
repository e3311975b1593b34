"""The citation panel: a cited passage inside its section, and the whole file it came from.

An answer's [n] links to `#cite:<collection>:<chunk id>` (ui.chat.linkify); the page script
(`CLICK_JS`) turns a click into a call of the panel's handler, which renders here. Everything
comes from the collection itself, so only what the knowledge base holds can be shown: the
section is rebuilt from the stored chunks of the same heading path, and "open the whole file"
reads the file on disk only when the collection has chunks of exactly that source, it is a
regular text file, and (for uploads) it lies inside the collection's uploads folder.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from ingest.loader import TEXT_SUFFIXES
from rag.types import Hit
from ui.uploads import UPLOADS_PREFIX, uploaded_file

REF_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]{0,254}):([0-9a-f]{1,64})$")
MAX_FILE_BYTES = 2_000_000  # the panel is for reading, not for shipping big files to the browser

# Delegated click handler: a citation link fills the hidden #cite-ref box and presses #cite-open.
# Capture phase, so Gradio's own link handling (new tab) never sees the click.
CLICK_JS = """
<script>
document.addEventListener('click', (e) => {
  const a = e.target.closest && e.target.closest('a[href*="#cite:"]');
  if (!a) return;
  e.preventDefault(); e.stopPropagation();
  const ref = decodeURIComponent(a.getAttribute('href').split('#cite:')[1] || '');
  const box = document.querySelector('#cite-ref textarea, #cite-ref input');
  if (!box) return;
  box.value = ref;
  box.dispatchEvent(new Event('input', {bubbles: true}));
  setTimeout(() => document.querySelector('#cite-open').click(), 30);
}, true);
</script>
"""

CSS = """
#passage { max-height: 70vh; overflow-y: auto; }
.passage-head { font-size: 0.9rem; margin-bottom: 0.4rem; }
.passage-head code { overflow-wrap: anywhere; }
.passage-body { white-space: pre-wrap; font-size: 0.88rem; line-height: 1.45; margin: 0;
                font-family: var(--font-mono); background: var(--background-fill-secondary);
                padding: 0.6rem; border-radius: 6px; }
.passage-body mark { background: #fde68a; color: inherit; padding: 0 1px; border-radius: 2px; }
"""


class CitationError(ValueError):
    """What the panel says instead of a passage (unknown link, chunk gone, file not servable)."""


def parse_ref(ref: str) -> tuple[str, str]:
    m = REF_RE.match((ref or "").strip())
    if not m:
        raise CitationError("this citation link is malformed; ask the question again")
    return m.group(1), m.group(2)


def section(chunks: list[Hit], cited: Hit) -> tuple[str, tuple[int, int]]:
    """The text of `cited`'s section (its chunks with the same heading path, overlaps merged)
    and the span of the cited passage within it."""
    same = [c for c in chunks if c.header_path == cited.header_path] or [cited]
    text, span, end = "", (0, len(cited.text)), None
    for c in same:
        start = c.metadata.get("start")
        overlap = 0
        if end is not None and start is not None and start < end:
            overlap = min(end - start, len(c.text))  # the chunker repeats this much of the previous chunk
        elif text:
            text += "\n\n"
        begin = len(text) - overlap
        text += c.text[overlap:]
        if c.id == cited.id:
            span = (begin, begin + len(c.text))
        if start is not None:
            end = max(end or 0, int(start) + len(c.text))
    return text, span


def _marked(text: str, span: tuple[int, int]) -> str:
    a, b = span
    return (html.escape(text[:a]) + '<mark id="cited">' + html.escape(text[a:b]) + "</mark>"
            + html.escape(text[b:]))


def _head(hit: Hit, note: str) -> str:
    heading = f" › {html.escape(hit.header_path)}" if hit.header_path else ""
    return (f'<div class="passage-head"><code>{html.escape(hit.source)}</code>{heading}'
            f'<br><small>{html.escape(note)}</small></div>')


def passage_html(cited: Hit, chunks: list[Hit]) -> str:
    """File, heading path, and the section with the cited passage highlighted."""
    text, span = section(chunks, cited)
    note = f"passage {cited.chunk_index + 1} of {len(chunks)} in this file, highlighted within its section"
    return _head(cited, note) + f'<pre class="passage-body">{_marked(text, span)}</pre>'


def source_path(source: str, uploads_root: Path) -> Path | None:
    """The file on disk behind a source name, if it may be shown: a regular text file, and an
    upload only from inside the collection's uploads folder."""
    if source.startswith(UPLOADS_PREFIX):
        return uploaded_file(uploads_root, source)
    path = Path(source)
    if path.suffix.lower() not in TEXT_SUFFIXES or not path.is_file():
        return None
    return path


def file_html(cited: Hit, chunks: list[Hit], uploads_root: Path) -> str:
    """The whole file with the cited passage highlighted; the caller has checked that the
    collection holds `cited.source` (chunks is its non-empty chunk list)."""
    if not chunks:
        raise CitationError(f"{cited.source} is not in the knowledge base")
    path = source_path(cited.source, uploads_root)
    if path is None:
        raise CitationError(f"{cited.source} is not on this server's disk (ingested elsewhere, or deleted); "
                            f"its stored passages are all that can be shown")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise CitationError(f"{cited.source} is over {MAX_FILE_BYTES // 1_000_000} MB; open it on disk")
    text = path.read_text(encoding="utf-8", errors="replace")
    start = cited.metadata.get("start")
    if start is not None and text[int(start): int(start) + len(cited.text)] == cited.text:
        span = (int(start), int(start) + len(cited.text))
    else:  # the file changed since the ingest: find the passage by its text, if it is still there
        at = text.find(cited.text)
        span = (at, at + len(cited.text)) if at >= 0 else (0, 0)
    return _head(cited, f"the whole file ({len(text)} characters)") + f'<pre class="passage-body">{_marked(text, span)}</pre>'
