"""The query adapter (rag/adapter.py): a linear map of question vectors fitted at ingest on each
collection's (heading, chunk) pairs, used by hybrid search (docs/benchmarks.md, "Round 5")."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ingest.config import IngestConfig
from ingest.pipeline import ingest
from rag import adapter
from rag.config import RagConfig
from rag.retriever import Retriever
from rag.store import STRONG, MilvusStore
from tests.conftest import shared_data

# A paraphrase (en dev set, enp32) of the FAQ entry "Does Milvus load the entire collection when
# partitions are specified for a search?": over the FAQ folder the adapter lifts it from 2 to 1.
QUESTION = "When I search only some partitions, does everything still get loaded into memory?"
GOLD = "Does Milvus load the entire collection when partitions are specified for a search?"


def _ingest(docs: Path, uri: str, embedder, store: MilvusStore) -> None:
    cfg = RagConfig.load(environ={}, milvus_uri=uri, collection=store.collection)
    ingest([str(docs)], cfg, IngestConfig.load(environ={}), embedder=embedder, store=store, progress=False,
           warn=lambda m: None)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_fit_learns_a_linear_map_that_carries_to_unseen_queries():
    """Queries live in a linearly distorted space; W, fitted on some (query, chunks) pairs, puts
    unseen queries next to their own chunks far more often than the plain vectors do."""
    rng = np.random.default_rng(7)
    d, n = 32, 400
    chunks = _unit(rng.normal(size=(2 * n, d))).astype(np.float32)
    members = [[2 * i, 2 * i + 1] for i in range(n)]  # two chunks per heading
    distort = np.eye(d) + 1.5 * rng.normal(size=(d, d)) / np.sqrt(d)
    queries = _unit(np.stack([chunks[m].mean(0) for m in members]) @ distort).astype(np.float32)
    train, test = np.arange(300), np.arange(300, n)

    w = adapter.fit(queries[train], [members[i] for i in train], chunks)

    def top1(vecs: np.ndarray) -> float:
        best = (vecs @ chunks.T).argmax(1) // 2
        return float((best == test).mean())

    plain = top1(queries[test])
    adapted = top1(np.stack([adapter.apply(w, q) for q in queries[test]]))
    assert plain < 0.5 and adapted > 0.8, (plain, adapted)  # 0.32 -> 0.88 here
    assert np.allclose(np.linalg.norm(adapter.apply(w, queries[0])), 1.0, atol=1e-5)


def test_ingest_fits_the_adapter_and_hybrid_search_uses_it(tmp_path: Path, milvus_uri: str, embedder):
    docs = tmp_path / "faq"
    shutil.copytree(shared_data("milvus_docs_en") / "faq", docs)
    store = MilvusStore(milvus_uri, "faq")
    try:
        _ingest(docs, milvus_uri, embedder, store)
        stamp = store.describe()["properties"][adapter.PROPERTY]
        assert stamp.startswith(adapter.side_collection(store) + "@")
        w = adapter.load(store, embedder.dim)
        assert w is not None and w.shape == (embedder.dim, embedder.dim)

        on = Retriever(store, embedder, mode="hybrid").retrieve(QUESTION, 5)
        off = Retriever(store, embedder, mode="hybrid", query_adapter=False).retrieve(QUESTION, 5)
        assert on.hits[0].header_path.endswith(GOLD), [h.header_path for h in on.hits]
        assert not off.hits[0].header_path.endswith(GOLD)
        assert any(h.header_path.endswith(GOLD) for h in off.hits)  # it was there, lower

        # The score floor still reads the question's own cosine, not the adapted vector's.
        q = embedder.embed_query(QUESTION)
        rows = store.client.query("faq", filter=f"id in {[h.id for h in on.hits]!r}", output_fields=["vector"],
                                  consistency_level=STRONG)
        own = {r["id"]: float(np.dot(np.asarray(r["vector"], dtype=np.float32), q)) for r in rows}
        assert all(abs(h.similarity - own[h.id]) < 1e-4 for h in on.hits)

        # An unchanged re-ingest keeps the adapter; a collection from before it gets one.
        _ingest(docs, milvus_uri, embedder, store)
        assert store.describe()["properties"][adapter.PROPERTY] == stamp
        # A small change waits, counted; changes past REFIT_SHARE of the chunks fitted on refit.
        (docs / "note.md").write_text("# A short note\n\nOne more section.\n", encoding="utf-8")
        _ingest(docs, milvus_uri, embedder, store)
        props = store.describe()["properties"]
        assert props[adapter.PROPERTY] == stamp and props[adapter.PENDING] == "1"
        max(docs.glob("*_faq.md"), key=lambda p: p.stat().st_size).unlink()
        _ingest(docs, milvus_uri, embedder, store)
        props = store.describe()["properties"]
        assert props[adapter.PROPERTY] != stamp and props[adapter.PENDING] == "0"
        store.client.drop_collection(adapter.side_collection(store))
        store.client.drop_collection_properties("faq", [adapter.PROPERTY])
        assert not adapter.fitted(store)
        _ingest(docs, milvus_uri, embedder, store)
        assert adapter.fitted(store) and adapter.load(store, embedder.dim) is not None
    finally:
        store.close()


def test_a_collection_with_few_headings_has_no_adapter_and_searches_as_before(small_corpus: Path, milvus_uri: str,
                                                                              embedder):
    store = MilvusStore(milvus_uri, "small")
    try:
        _ingest(small_corpus, milvus_uri, embedder, store)
        assert adapter.fitted(store) and adapter.load(store, embedder.dim) is None
        assert not store.client.has_collection(adapter.side_collection(store))
        on = Retriever(store, embedder, mode="hybrid").retrieve("how are indexes built?", 3)
        off = Retriever(store, embedder, mode="hybrid", query_adapter=False).retrieve("how are indexes built?", 3)
        assert [h.id for h in on.hits] == [h.id for h in off.hits] and on.hits[0].source.endswith("index.md")
    finally:
        store.close()
