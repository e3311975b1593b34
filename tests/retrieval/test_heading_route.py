"""The heading route of hybrid search: each chunk's own heading embedded alone, a third RRF list
(docs/benchmarks.md, "Round 4"). Real MiniLM, real Milvus Lite."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
from pymilvus import DataType

from ingest.config import IngestConfig
from ingest.pipeline import ingest
from rag.config import RagConfig
from rag.retriever import Retriever
from rag.schema import HEADING_FIELD, SCHEMA_VERSION, build_schema, heading_text
from rag.store import STRONG, MilvusStore
from rag.types import Chunk
from tests.conftest import shared_data

# A paraphrase (en dev set, enp29) of the FAQ entry "What is the maximum length of self-defined
# entity primary keys?" that shares none of its words: the heading route lifts it from 2 to 1.
QUESTION = "How long may my own ID values be?"
GOLD = "What is the maximum length of self-defined entity primary keys?"


def _ingest(docs: Path, uri: str, embedder, store: MilvusStore) -> list[str]:
    """Ingest ``docs``; returns the warnings it gave."""
    cfg = RagConfig.load(environ={}, milvus_uri=uri, collection=store.collection)
    warnings: list[str] = []
    report = ingest([str(docs)], cfg, IngestConfig.load(environ={}), embedder=embedder, store=store, progress=False,
                    warn=warnings.append)
    assert report.chunks_written > 0
    return warnings


def _vector_fields(store: MilvusStore) -> list[str]:
    return [f["name"] for f in store.describe()["fields"] if f["type"] == DataType.FLOAT_VECTOR]


def test_heading_text_is_the_last_heading_else_the_title():
    def chunk(path: tuple[str, ...], **md) -> Chunk:
        return Chunk(source="docs/faq/product_faq.md", chunk_index=0, text="t", header_path=path, start=0, end=1,
                     metadata=md)

    assert heading_text(chunk(("Product FAQ", "Can it run on ARM?"))) == "Can it run on ARM?"
    assert heading_text(chunk(())) == "product faq"  # the file name as words
    assert heading_text(chunk((), front_matter={"title": "Milvus FAQ"})) == "Milvus FAQ"


def test_new_collection_has_the_heading_route_and_it_ranks_a_paraphrased_faq_first(tmp_path: Path, milvus_uri: str,
                                                                                  embedder):
    docs = tmp_path / "faq"
    shutil.copytree(shared_data("milvus_docs_en") / "faq", docs)
    store = MilvusStore(milvus_uri, "faq")
    try:
        assert not [w for w in _ingest(docs, milvus_uri, embedder, store) if "predates" in w]
        assert store.bm25 and store.heading and _vector_fields(store) == ["vector", HEADING_FIELD]

        # Every row holds the embedding of its own heading (embedded once per distinct text).
        rows = store.client.query("faq", filter="", output_fields=["header_path", "source", "metadata",
                                                                   HEADING_FIELD], limit=1000,
                                  consistency_level=STRONG)
        for r in rows[:20]:
            path = tuple(h for h in r["header_path"].split(" › ") if h)
            md = r["metadata"] or {}
            c = Chunk(source=r["source"], chunk_index=0, text="", header_path=path, start=0, end=0,
                      metadata={"front_matter": md["front_matter"]} if "front_matter" in md else {})
            want = embedder.embed_documents([heading_text(c)])[0]
            assert float(np.dot(np.asarray(r[HEADING_FIELD], dtype=np.float32), want)) > 0.999

        with_route = Retriever(store, embedder, mode="hybrid").retrieve(QUESTION, 5)
        without = Retriever(store, embedder, mode="hybrid", heading_weight=0.0).retrieve(QUESTION, 5)
        assert with_route.mode == without.mode == "hybrid"
        assert with_route.hits[0].header_path.endswith(GOLD), [h.header_path for h in with_route.hits]
        assert not without.hits[0].header_path.endswith(GOLD)
        assert any(h.header_path.endswith(GOLD) for h in without.hits)  # it was there, lower
        assert all(h.similarity is not None for h in with_route.hits)  # the score floor still applies

        # Re-ingesting the unchanged folder writes nothing (the field changes no chunk id).
        cfg = RagConfig.load(environ={}, milvus_uri=milvus_uri, collection="faq")
        again = ingest([str(docs)], cfg, IngestConfig.load(environ={}), embedder=embedder, store=store,
                       progress=False)
        assert again.chunks_written == 0
    finally:
        store.close()


def test_collection_without_the_heading_field_answers_as_before(small_corpus: Path, milvus_uri: str, embedder,
                                                                 caplog):
    """A collection made before the heading route (schema 2, one vector field) opens, takes an
    incremental ingest and answers in hybrid mode, with no warning and no error."""
    store = MilvusStore(milvus_uri, "old")
    index = store.client.prepare_index_params()
    index.add_index("vector", index_type="AUTOINDEX", metric_type="IP")
    index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    store.client.create_collection(
        "old", schema=build_schema(embedder.dim, "english", True), index_params=index, consistency_level=STRONG,
        properties={"rag.embedder": embedder.model_id, "rag.schema": SCHEMA_VERSION, "rag.analyzer": "english"},
    )
    try:
        with caplog.at_level(logging.WARNING):
            hints = _ingest(small_corpus, milvus_uri, embedder, store)
            assert store.bm25 and not store.heading and _vector_fields(store) == ["vector"]
            # one line that says how to get the route
            assert len(hints) == 1 and "predates" in hints[0] and "--recreate" in hints[0], hints
            retriever = Retriever(store, embedder, mode="hybrid")
            assert retriever.heading_weight > 0  # the embedder has a route; the collection does not
            got = retriever.retrieve("how are indexes built?", 3)
            reopened = MilvusStore(milvus_uri, "old")
            reopened.open_existing(embedder)
            again = Retriever(reopened, embedder, mode="hybrid").retrieve("how are indexes built?", 3)
            reopened.close()
        assert got.mode == "hybrid" and got.hits[0].source.endswith("index.md")
        assert [h.id for h in again.hits] == [h.id for h in got.hits]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("rag")]
    finally:
        store.close()



def test_an_embedder_without_a_heading_route_gets_no_heading_vectors(small_corpus: Path, milvus_uri: str):
    """No vectors are paid for (an OpenAI embedder bills each one) or stored that no search
    reads: an embedder whose heading weight is 0 (e5, OpenAI; here the test double) gets BM25
    and one vector field, and nothing embeds its headings."""
    from tests.support.hash_embedder import HashEmbedder

    class Counting(HashEmbedder):
        texts = 0

        def embed_documents(self, texts):
            Counting.texts += len(texts)
            return super().embed_documents(texts)

    embedder = Counting(dim=16)
    store = MilvusStore(milvus_uri, "no_route")
    try:
        assert not [w for w in _ingest(small_corpus, milvus_uri, embedder, store) if "predates" in w]
        assert store.bm25 and not store.heading and _vector_fields(store) == ["vector"]
        assert Counting.texts == store.stats()["chunks"]  # the chunks' own vectors, no heading ones
    finally:
        store.close()


class _TimedEmbedder:
    """The real embedder, with the seconds spent inside `embed_documents` added up."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            return self.inner.embed_documents(texts)
        finally:
            self.seconds += time.perf_counter() - t0


def test_ingest_counts_the_heading_embeddings_as_embedding_time(small_corpus: Path, milvus_uri: str, embedder):
    # The store embeds each batch's headings inside upsert; the report's "embedding N s" left
    # those seconds out before upsert returned them.
    timed = _TimedEmbedder(embedder)
    store = MilvusStore(milvus_uri, "docs")
    try:
        cfg = RagConfig.load(environ={}, milvus_uri=milvus_uri, collection=store.collection)
        report = ingest([str(small_corpus)], cfg, IngestConfig.load(environ={}), embedder=timed, store=store,
                        progress=False)
        assert store.heading and report.chunks_written > 0
        assert report.embed_seconds >= timed.seconds > 0
    finally:
        store.close()
