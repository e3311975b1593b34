"""What BM25 sees: the analyzer of the collection's BM25 field, and the text fed to it.

A chunk's BM25 text is its document title, its heading path and its text: a question that
names a page or section ("the product FAQ", "incremental ingest") then matches every chunk
under it, not only the one chunk that repeats the heading's words. The stored `text` field
stays the exact source text for citations.

Analyzers (the `rag.analyzer` property of a collection):
- `standard`: Milvus' standard tokenizer (Unicode word boundaries, lowercased).
- `english`: the standard tokenizer plus English stop words (a Milvus `stop` filter) over text
  that is Snowball-stemmed here, in Python, on both the chunk and the question. Milvus Lite
  3.2 has neither the `english` analyzer type ("unknown tokenizer type") nor a working
  `stemmer` filter (accepted, and silently ignored: "building" never matched "build"), so the
  stemming happens before Milvus, identically on Lite and on a server.
- `jieba`: Chinese word segmentation (one CJK run is one token under `standard`).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from rag.types import Chunk

# Lucene's English stop set: function words that only add noise to a paraphrased question.
ENGLISH_STOP_WORDS = [
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not",
    "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was",
    "will", "with",
]
# Milvus analyzer settings per analyzer name; the same on Milvus Lite and a 2.5+ server.
# ({"type": "chinese"} and {"type": "english"} are server-only; Lite rejects them.)
ANALYZER_PARAMS: dict[str, dict[str, Any]] = {
    "standard": {"type": "standard"},
    "english": {"tokenizer": "standard", "filter": ["lowercase", {"type": "stop", "stop_words": ENGLISH_STOP_WORDS}]},
    "jieba": {"tokenizer": "jieba", "filter": ["lowercase"]},
}
ANALYZERS = tuple(ANALYZER_PARAMS)
DEFAULT_ANALYZER = "english"  # for text that is not mostly CJK: best on the en dev set (docs/benchmarks.md)
STEMMED = {"english"}  # analyzers whose text is stemmed in Python before Milvus sees it
WORD = re.compile(r"[A-Za-z]+")  # Snowball's English stemmer knows ASCII letters only


def resolve_analyzer(name: str, cjk: bool) -> str:
    """`auto`: jieba for a mostly-CJK corpus, else the default; any other name as given."""
    if name != "auto":
        return name
    return "jieba" if cjk else DEFAULT_ANALYZER


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer  # PyStemmer: the Snowball stemmers in C

    s = Stemmer.Stemmer("english")
    s.maxCacheSize = 100_000  # technical docs repeat a small vocabulary; stemming is then a dict lookup
    return s


def stem(text: str) -> str:
    """Each ASCII word replaced by its Snowball stem, lowercased; everything else kept."""
    s = _stemmer()
    return WORD.sub(lambda m: s.stemWord(m.group(0).lower()), text)


def title_of(chunk: Chunk) -> str:
    """The document's title: front matter `title`, else its file name as words."""
    fm = chunk.metadata.get("front_matter") or {}
    title = fm.get("title") if isinstance(fm, dict) else None
    if isinstance(title, str) and title.strip():
        return title.strip()
    name = chunk.source.replace("\\", "/").rsplit("/", 1)[-1]
    return re.sub(r"[_\-.]+", " ", name.rsplit(".", 1)[0]).strip()


def document_text(chunk: Chunk, analyzer: str) -> str:
    """The BM25 text of a chunk: title, heading path (without a heading equal to the title), text."""
    title = title_of(chunk)
    heads = [h for h in (title, *(h for h in chunk.header_path if h.strip().lower() != title.lower())) if h]
    text = f"{' › '.join(heads)}\n{chunk.text}" if heads else chunk.text
    return stem(text) if analyzer in STEMMED else text


def query_text(question: str, analyzer: str) -> str:
    """A question as the collection's BM25 field expects it."""
    return stem(question) if analyzer in STEMMED else question
