"""What BM25 indexes (schema 2): title + heading path + text, and the analyzers, on real Milvus Lite."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag import bm25
from rag.store import MilvusStore, StoreError
from rag.types import Chunk
from tests.support.hash_embedder import HashEmbedder

EMB = HashEmbedder(16)


def _chunk(source: str, text: str, path: tuple[str, ...] = (), front_matter: dict | None = None) -> Chunk:
    return Chunk(source=source, chunk_index=0, text=text, header_path=path, start=0, end=len(text),
                 file_hash=source, chunk_count=1, metadata={"front_matter": front_matter} if front_matter else {})


CHUNKS = [
    _chunk("docs/ingest.md", "1. reads the stored state once\n2. skips files whose hash is unchanged",
           ("Ingest", "How a run decides what to re-embed")),
    _chunk("docs/faq/product_faq.md", "It is open source and free of charge.", ("Pricing",),
           {"title": "Product FAQ"}),
    _chunk("docs/index.md", "We build an index for every segment, then load it.", ("Indexes",)),
    _chunk("docs/other.md", "Unrelated words about weather and tea.", ("Misc",)),
]


def _store(uri: str, analyzer: str) -> MilvusStore:
    store = MilvusStore(uri, f"t_{analyzer}")
    store.ensure(EMB, analyzer=analyzer)
    store.upsert(CHUNKS, EMB.embed_documents([c.text for c in CHUNKS]), EMB.model_id)
    store.flush()
    return store


def test_bm25_text_carries_title_and_heading_path():
    text = bm25.document_text(CHUNKS[1], "standard")
    assert text.splitlines()[0] == "Product FAQ › Pricing"  # front matter title, then the path
    assert text.endswith(CHUNKS[1].text)
    # No front matter: the file name stands for the title; a first heading equal to it is not repeated.
    assert bm25.document_text(_chunk("a/product_faq.md", "x", ("Product FAQ", "Cost")), "standard") == \
        "product faq › Cost\nx"
    assert bm25.document_text(_chunk("ingest.md", "x", ("Ingest", "Crash safety")), "standard") == \
        "ingest › Crash safety\nx"


@pytest.mark.parametrize("analyzer", ["standard", "english"])
def test_heading_and_title_words_find_a_chunk_whose_text_lacks_them(milvus_uri: str, analyzer: str):
    """Schema 1 indexed the chunk text alone: neither query matched any word of the gold chunk."""
    store = _store(milvus_uri, analyzer)
    try:
        assert store.search_bm25("re-embed decision", 1)[0].source == "docs/ingest.md"
        assert store.search_bm25("product FAQ", 1)[0].source == "docs/faq/product_faq.md"
        hit = store.search_bm25("product FAQ", 1)[0]
        assert hit.text == CHUNKS[1].text  # the stored text stays the exact source text
    finally:
        store.close()


def test_english_analyzer_stems_and_drops_stop_words(milvus_uri: str):
    std = _store(milvus_uri, "standard")
    try:
        # "building indexes" shares no exact word with "We build an index ..." under `standard`.
        assert [h.source for h in std.search_bm25("building indexes", 3)] == ["docs/index.md"]  # heading "Indexes"
        assert std.search_bm25("builds", 3) == []
    finally:
        std.close()
    eng = MilvusStore(milvus_uri, "t_english")
    eng.ensure(EMB, analyzer="english")
    eng.upsert(CHUNKS, EMB.embed_documents([c.text for c in CHUNKS]), EMB.model_id)
    eng.flush()
    try:
        assert eng.analyzer == "english"
        assert eng.search_bm25("builds", 3)[0].source == "docs/index.md"  # stem "build"
        assert eng.search_bm25("decided", 3)[0].source == "docs/ingest.md"  # "decides" -> "decid"
        assert eng.search_bm25("the of and", 3) == []  # stop words only: nothing to match
    finally:
        eng.close()
    reopened = MilvusStore(milvus_uri, "t_english")
    try:
        reopened.ensure(EMB)  # the analyzer comes from the collection, so queries are stemmed too
        assert reopened.analyzer == "english"
        assert reopened.search_bm25("builds", 3)[0].source == "docs/index.md"
    finally:
        reopened.close()


def test_collection_of_an_older_schema_gets_one_clear_error(milvus_uri: str, tmp_path: Path):
    store = _store(milvus_uri, "standard")
    store.client.alter_collection_properties(store.collection, {"rag.schema": "1"})
    try:
        with pytest.raises(StoreError, match=r"schema 1.*--recreate"):
            store.ensure(EMB)
        store.ensure(EMB, recreate=True)  # the fix the message names works
        assert store.describe()["properties"]["rag.schema"] == "2"
    finally:
        store.close()
