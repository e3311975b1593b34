"""Header-aware markdown chunking, measured in the embedder's own tokens.

1. Sections: the file is cut at headings outside code fences; each section carries its
   header path (h1 > h2 > h3 ...). A section with only a heading is merged into the next one.
2. Blocks: a section is cut into paragraphs, fenced code blocks and tables. Fences and tables
   are atomic: they are never cut while they fit in one chunk.
3. Packing: blocks are packed greedily up to the token and byte budgets, with block-level
   overlap. A block larger than the budget is split by langchain's recursive markdown splitter,
   and a piece still over the byte budget is cut at it.

Non-text runs (`blobs`: an inline base64 image, a hex dump) are left out of every chunk; the
pipeline reports each file that had one. WordPiece reads such a run as a few [UNK] tokens, so
the token budget alone let a 51 KB run become one chunk with a meaningless vector, and an 80 KB
one a chunk over Milvus' VARCHAR limit that aborted the whole run.

Why not `MarkdownHeaderTextSplitter` for step 1: it strips the leading whitespace of every
line (Python inside a fence loses its indentation) and drops character offsets, and a docs
QA product must store code exactly and point back into the source.

Every chunk's text is exactly `document.text[start:end]`, `len(tokens(embed_text))` is at most
the embedder's limit (nothing is truncated at embedding time), and its UTF-8 size is at most
`max_bytes`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

from ingest.loader import Document
from rag.schema import TEXT_MAX_BYTES
from rag.types import Chunk

# Every heading level starts a section: FAQ-style docs put one question under each h4.
HEADER_RE = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
# Fences nested in list items are indented past CommonMark's 3 spaces; docs use them everywhere.
FENCE_RE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
TABLE_RE = re.compile(r"^ {0,3}\|")
MARKDOWN_SEPARATORS = RecursiveCharacterTextSplitter.get_separators_for_language(Language.MARKDOWN)
# Inside an oversized fence or table only line structure matters; markdown separators such as
# "```" would peel the closing fence off into a fragment of its own.
LINE_SEPARATORS = ["\n\n", "\n", " ", ""]
# Byte budget per token of the chunk size. Real docs stay under 12 bytes per token (the Milvus
# and Chinese docs' largest 256-token chunk is 2.9 KB), so only runs the tokenizer barely sees
# (long [UNK] words, whitespace) meet this cap.
BYTES_PER_TOKEN = 32
# A whitespace-free run of printable ASCII this long, mostly letters and digits, is data, not
# text. The longest such runs in the Milvus, Chinese and bulk docs that are text are table
# rules (660 characters, all punctuation); every run over 1,000 is a base64 image or hex.
BLOB_RE = re.compile(r"[!-~]{1000,}")


@dataclasses.dataclass(frozen=True)
class Span:
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class Section:
    start: int
    end: int
    path: tuple[str, ...]


def _lines(text: str, start: int, end: int):
    """(line_start, line_end_with_newline, line_without_newline) over text[start:end]."""
    pos = start
    for line in text[start:end].splitlines(keepends=True):
        yield pos, pos + len(line), line.rstrip("\r\n")
        pos += len(line)


def sections(text: str, start: int = 0) -> list[Section]:
    """Split at headings outside fences; heading-only sections merge into the next."""
    raw: list[tuple[int, tuple[str, ...]]] = [(start, ())]
    path: list[str] = []
    fence: str | None = None
    for ls, _le, line in _lines(text, start, len(text)):
        m = FENCE_RE.match(line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip(" `~"):
                fence = None
            continue
        if m:
            fence = m.group(1)
            continue
        h = HEADER_RE.match(line)
        if h:
            level = len(h.group(1))
            path = path[: level - 1] + [""] * (level - 1 - len(path)) + [h.group(2).strip()]
            raw.append((ls, tuple(p for p in path if p)))
    out: list[Section] = []
    pending: int | None = None  # start of heading-only sections waiting to merge forward
    for i, (s, p) in enumerate(raw):
        e = raw[i + 1][0] if i + 1 < len(raw) else len(text)
        first_nl = text.find("\n", s, e)
        body = text[first_nl + 1 : e] if (p and first_nl != -1) else ("" if p else text[s:e])
        if not body.strip():
            if pending is None:
                pending = s
            continue
        out.append(Section(pending if pending is not None else s, e, p))
        pending = None
    if pending is not None:  # trailing heading-only text joins the previous section
        if out:
            out[-1] = dataclasses.replace(out[-1], end=len(text))
        elif text[pending:].strip():
            out.append(Section(pending, len(text), raw[-1][1]))
    return out


def blocks(text: str, sec: Section) -> list[tuple[Span, bool]]:
    """Paragraphs, fences and tables of a section as (span, atomic)."""
    out: list[tuple[Span, bool]] = []
    cur: tuple[int, int, str] | None = None  # (start, end, kind) of the open block
    fence: str | None = None
    for ls, le, line in _lines(text, sec.start, sec.end):
        if fence:
            cur = (cur[0], le, "fence")  # type: ignore[index]
            m = FENCE_RE.match(line)
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip(" `~"):
                out.append((Span(cur[0], le), True))
                cur, fence = None, None
            continue
        m = FENCE_RE.match(line)
        kind = "fence" if m else "table" if TABLE_RE.match(line) else "blank" if not line.strip() else "para"
        if cur and (kind != cur[2] or kind == "fence"):
            out.append((Span(cur[0], cur[1]), cur[2] == "table"))
            cur = None
        if kind == "blank":
            continue
        if kind == "fence":
            fence = m.group(1)  # type: ignore[union-attr]
        cur = (ls if cur is None else cur[0], le, kind)
    if cur:
        out.append((Span(cur[0], cur[1]), cur[2] in ("table", "fence")))
    return out


def blobs(text: str, start: int = 0) -> list[Span]:
    """The non-text runs of `text[start:]` that chunking leaves out."""
    return [
        Span(m.start(), m.end()) for m in BLOB_RE.finditer(text, start)
        if sum(ch.isalnum() for ch in m.group()) * 2 >= len(m.group())
    ]


def _without(blocks: list[tuple[Span, bool]], holes: list[Span]) -> list[tuple[Span, bool]]:
    """`blocks` with the `holes` (sorted, disjoint) cut out; what is left of a block keeps its kind."""
    out: list[tuple[Span, bool]] = []
    for span, atomic in blocks:
        pos = span.start
        for h in holes:
            if h.start < span.end and h.end > pos:
                if h.start > pos:
                    out.append((Span(pos, h.start), atomic))
                pos = h.end
        if pos < span.end:
            out.append((Span(pos, span.end), atomic))
    return out


def _tile(pieces: list[str], text: str, base: int) -> list[Span]:
    """Offsets of the splitter's pieces, which tile `text` in order with only whitespace between.

    Not langchain's `add_start_index`: it steps back `chunk_overlap` characters to search for
    the next piece, but our overlap is in tokens (several characters each), so it misses the
    piece and reports -1, which made chunks repeat the block's start and drop its middle. With
    no splitter overlap each piece starts at the first non-blank character after the previous
    one, so the search is exact even in repetitive text (the "-----" rules of wide tables).
    """
    spans: list[Span] = []
    pos = 0
    for piece in pieces:
        at = text.find(piece, pos)
        if at < 0 or text[pos:at].strip():  # would drop text: a splitter change we must notice
            raise AssertionError(f"splitter piece does not follow its predecessor: {piece[:40]!r}")
        spans.append(Span(base + at, base + at + len(piece)))
        pos = at + len(piece)
    return spans


class Chunker:
    """Chunks documents for one embedder; `count_tokens` is the embedder's own counter."""

    def __init__(self, count_tokens: Callable[[str], int], max_tokens: int, chunk_size: int = 256, overlap: int = 32):
        self.count = count_tokens
        self.limit = min(chunk_size, max_tokens)
        self.max_tokens = max_tokens
        self.overlap = overlap
        self.max_bytes = min(TEXT_MAX_BYTES, self.limit * BYTES_PER_TOKEN)

    def _prefix(self, path: tuple[str, ...]) -> tuple[str, ...]:
        # A header path longer than half the budget would crowd out the text; keep its tail.
        while path and self.count(" > ".join(path)) > self.limit // 2:
            path = path[1:]
        return path

    def _fits(self, prefix: str, text: str) -> bool:
        # Bytes first: they are cheap, and spare the tokenizer a huge run.
        return len(text.encode()) <= self.max_bytes and self.count(prefix + text) <= self.limit

    @staticmethod
    def _cut_bytes(text: str, span: Span, max_bytes: int) -> list[Span]:
        """`span` in consecutive pieces of at most `max_bytes` UTF-8 bytes, cut at the last
        whitespace of each piece's second half, else hard on a character boundary."""
        out: list[Span] = []
        pos = span.start
        while True:
            window = text[pos : min(span.end, pos + max_bytes)]  # >= max_bytes bytes unless at the end
            raw = window.encode()
            if pos + len(window) == span.end and len(raw) <= max_bytes:
                break
            head = raw[:max_bytes].decode(errors="ignore")  # whole characters only
            cut = max(head.rfind(" "), head.rfind("\n"))
            n = max(cut + 1 if cut >= len(head) // 2 else len(head), 1)
            out.append(Span(pos, pos + n))
            pos += n
            while pos < span.end and text[pos].isspace():  # pieces start at text, as the splitter's do
                pos += 1
        if pos < span.end:
            out.append(Span(pos, span.end))
        return out

    def _split_oversize(self, text: str, span: Span, prefix: str, atomic: bool) -> list[Span]:
        """Split a too-long block with the recursive markdown splitter; offsets stay exact."""
        specials = self.count("")  # every count includes the special tokens ([CLS] and [SEP])
        budget = self.limit - self.count(prefix) if prefix else self.limit - specials
        max_bytes = self.max_bytes
        piece_text = text[span.start : span.end]

        def length(s: str) -> int:
            # The splitter sums the lengths of the pieces it merges (words, at worst), so each
            # must be its own token count; counting the specials once per word would fill a
            # piece to a third of the budget.  A piece of zero tokens (zero-width or control
            # characters the tokenizer drops) counts as one: with a length of 0 the splitter
            # would carry it, and the pieces before it, into the next chunk as well.
            return max(self.count(s) - specials, 1 if s else 0)

        while True:
            splitter = RecursiveCharacterTextSplitter(
                separators=LINE_SEPARATORS if atomic else MARKDOWN_SEPARATORS, is_separator_regex=not atomic,
                chunk_size=max(budget, 8), chunk_overlap=0, length_function=length,
            )
            spans = _tile(splitter.split_text(piece_text), piece_text, span.start)
            # A run of [UNK] words is few tokens but many bytes: the splitter keeps it whole.
            spans = [p for s in spans for p in self._cut_bytes(text, s, max_bytes)]
            if all(self._fits(prefix, text[s.start : s.end]) for s in spans):
                return self._overlap(text, spans, prefix, r"\n" if atomic else r"\s+")
            # Token boundaries shifted at the seams (or a byte cut split a word); tighten and redo.
            budget, max_bytes = int(budget * 0.9), int(max_bytes * 0.9)

    def _overlap(self, text: str, spans: list[Span], prefix: str, boundary: str) -> list[Span]:
        """Start each piece up to `overlap` tokens early, after a `boundary` in its predecessor
        (a line break in fences and tables, so overlap never starts mid-row)."""
        out = spans[:1]
        specials = self.count("")
        for prev, cur in zip(spans, spans[1:], strict=False):
            starts = [prev.start + m.end() for m in re.finditer(boundary, text[prev.start : cur.start])]
            best, lo, hi = cur.start, 0, len(starts)
            while lo < hi:  # earliest word start whose overlap and whole piece still fit
                mid = (lo + hi) // 2
                s = starts[mid]
                if self.count(text[s : cur.start]) - specials <= self.overlap and self._fits(prefix, text[s : cur.end]):
                    best, hi = s, mid
                else:
                    lo = mid + 1
            out.append(Span(min(best, cur.start), cur.end))
        return out

    def _pack(self, text: str, sec: Section, prefix: str, holes: list[Span], exact: bool = False) -> list[Span]:
        """Greedy packing. Token counts of blocks are added up (WordPiece never merges across the
        whitespace between blocks, so the sum is exact for it); `chunk` re-packs any chunk whose
        exact count still disagrees with `exact=True`."""
        out: list[Span] = []
        cur: list[Span] = []
        specials = self.count("")
        base = self.count(prefix) if prefix else specials
        sizes: dict[Span, int] = {}

        def size(b: Span) -> int:
            if b not in sizes:
                sizes[b] = self.count(text[b.start : b.end]) - specials
            return sizes[b]

        def fits(bs: list[Span]) -> bool:
            if exact or len(text[bs[0].start : bs[-1].end].encode()) > self.max_bytes:
                return self._fits(prefix, text[bs[0].start : bs[-1].end])
            return base + sum(size(b) for b in bs) <= self.limit

        def tail(bs: list[Span]) -> list[Span]:
            kept: list[Span] = []
            for b in reversed(bs[1:]):  # never the whole chunk, so packing always advances
                if sum(size(k) for k in kept) + size(b) > self.overlap:
                    break
                kept.append(b)
            return kept[::-1]

        for span, atomic in _without(blocks(text, sec), holes):
            if cur and fits([*cur, span]):
                cur.append(span)
                continue
            if cur:
                out.append(Span(cur[0].start, cur[-1].end))
                cur = tail(cur)
                if cur and fits([*cur, span]):
                    cur.append(span)
                    continue
                cur = []
            if fits([span]):
                cur = [span]
            else:
                out.extend(self._split_oversize(text, span, prefix, atomic))
        if cur:
            out.append(Span(cur[0].start, cur[-1].end))
        return out

    def chunk(self, doc: Document) -> list[Chunk]:
        """All chunks of `doc`, in order, with offsets, header paths and the file hash."""
        spans: list[tuple[Span, tuple[str, ...]]] = []
        holes = blobs(doc.text, doc.body_start)
        for sec in sections(doc.text, doc.body_start):
            path = self._prefix(sec.path)
            prefix = f"{' > '.join(path)}\n\n" if path else ""
            packed = self._pack(doc.text, sec, prefix, holes)
            if not all(self._fits(prefix, doc.text[s.start : s.end]) for s in packed):
                packed = self._pack(doc.text, sec, prefix, holes, exact=True)  # tokenizer without additive counts
            spans.extend((s, sec.path) for s in packed)
        chunks: list[Chunk] = []
        for span, path in spans:
            raw = doc.text[span.start : span.end]
            start = span.start + (len(raw) - len(raw.lstrip()))
            end = span.end - (len(raw) - len(raw.rstrip()))
            if end <= start:
                continue
            chunks.append(Chunk(
                source=doc.source, chunk_index=len(chunks), text=doc.text[start:end], header_path=path,
                start=start, end=end, file_hash=doc.file_hash,
                metadata={"front_matter": doc.metadata} if doc.metadata else {},
            ))
        chunks = [dataclasses.replace(c, chunk_count=len(chunks)) for c in chunks]
        for c in chunks:
            if self.count(self.embed_text(c)) > self.max_tokens:  # an invariant, not an input error
                raise AssertionError(f"{c.source} chunk {c.chunk_index} exceeds {self.max_tokens} tokens")
        return chunks

    def embed_text(self, c: Chunk) -> str:
        """The text the embedder sees: the (possibly shortened) header path, then the chunk."""
        path = self._prefix(c.header_path)
        return f"{' > '.join(path)}\n\n{c.text}" if path else c.text
