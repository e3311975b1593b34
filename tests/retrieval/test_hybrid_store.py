"""Hybrid-retrieval plumbing: BM25 capability fallback, the jieba analyzer, embedder separation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
from pymilvus import MilvusException

from ingest.config import IngestConfig
from ingest.pipeline import ingest
from rag.config import RagConfig
from rag.embedder import resolve_name
from rag.retriever import Retriever, weighted_rrf
from rag.store import MilvusStore, StoreError
from rag.types import Chunk, Hit
from tests.support.hash_embedder import HashEmbedder

ZH_PASSAGES = [
    "Milvus 数据存储在哪里？用户插入的数据以增量日志的方式存储在持久化存储上，元数据存储在 etcd 中。",
    "如何设置 IVF 索引的参数？nlist 的建议值为 4 × sqrt(n)，nprobe 需要在性能和准确率之间取舍。",
    "今天天气很好，我们去公园散步，然后在湖边喝茶。",
    "TiDB 是一款开源分布式关系型数据库，兼容 MySQL 协议。",
]


def _chunks(texts: Sequence[str]) -> list[Chunk]:
    return [Chunk(source=f"zh/{i}.md", chunk_index=0, text=t, header_path=(), start=0, end=len(t),
                  file_hash=str(i), chunk_count=1) for i, t in enumerate(texts)]


def _store_with(uri: str, analyzer: str, texts: Sequence[str] = ZH_PASSAGES) -> MilvusStore:
    emb = HashEmbedder(16, per_char=True)
    store = MilvusStore(uri, f"zh_{analyzer}")
    store.ensure(emb, analyzer=analyzer)
    chunks = _chunks(texts)
    store.upsert(chunks, emb.embed_documents([c.text for c in chunks]), emb.model_id)
    store.flush()
    return store


def test_jieba_analyzer_finds_chinese_passage_by_bm25(milvus_uri: str):
    store = _store_with(milvus_uri, "jieba")
    try:
        assert store.bm25 and store.describe()["properties"]["rag.analyzer"] == "jieba"
        hits = store.search_bm25("向量数据存储在什么地方", 3)
        assert hits[0].source == "zh/0.md"
        assert all(h.score > 0 for h in hits)  # Lite's negated BM25 distances come back positive
        assert store.search_bm25("nprobe 怎么设置", 1)[0].source == "zh/1.md"
        assert store.search_bm25("公园", 1)[0].source == "zh/2.md"
    finally:
        store.close()


def test_standard_analyzer_cannot_segment_chinese(milvus_uri: str):
    """Why jieba matters: `standard` keeps a whole CJK run as one token, so words never match."""
    store = _store_with(milvus_uri, "standard")
    try:
        assert store.search_bm25("公园", 3) == []
    finally:
        store.close()


def test_cjk_corpus_gets_jieba_and_an_e5_suggestion(tmp_path: Path, milvus_uri: str, embedder):
    docs = tmp_path / "zh"
    docs.mkdir()
    for i, t in enumerate(ZH_PASSAGES):
        (docs / f"{i}.md").write_text(f"# 问题 {i}\n\n{t}\n", encoding="utf-8")
    warnings: list[str] = []
    cfg = RagConfig.load(environ={}, milvus_uri=milvus_uri, collection="zh")
    ingest([str(docs)], cfg, IngestConfig.load(environ={}), embedder=embedder, progress=False,
           warn=warnings.append)
    assert any("--embedder e5" in w for w in warnings), warnings
    store = MilvusStore(milvus_uri, "zh")
    try:
        assert store.describe()["properties"]["rag.analyzer"] == "jieba"
        # `auto` keeps the collection's own embedder (its recorded MiniLM variant), and picks e5
        # only for a new CJK corpus.
        own = "minilm-int8" if embedder.int8 else "minilm-fp32"
        assert resolve_name("auto", store.recorded_embedder(), cjk=True) == own
        assert resolve_name("auto", None, cjk=True) == "e5"
        assert resolve_name("auto", None, cjk=False) == "minilm"
        assert resolve_name("e5", store.recorded_embedder()) == "e5"
    finally:
        store.close()


def test_no_bm25_functions_falls_back_to_dense_with_one_warning(small_corpus: Path, milvus_uri: str, embedder,
                                                                caplog):
    """A server without BM25 functions (Milvus < 2.5): ingest still works, hybrid runs dense."""
    store = MilvusStore(milvus_uri, "old_server")
    real_create = store.client.create_collection

    def create_without_functions(name, schema=None, **kw):
        if schema is not None and schema.functions:
            raise MilvusException(code=1, message="function type BM25 is not supported")
        return real_create(name, schema=schema, **kw)

    store.client.create_collection = create_without_functions
    cfg = RagConfig.load(environ={}, milvus_uri=milvus_uri, collection="old_server")
    with caplog.at_level(logging.WARNING):
        report = ingest([str(small_corpus)], cfg, IngestConfig.load(environ={}), embedder=embedder,
                        store=store, progress=False)
        assert report.chunks_written > 0
        assert not store.bm25 and store.describe()["properties"]["rag.analyzer"] == "none"
        retriever = Retriever(store, embedder, mode="hybrid")
        first = retriever.retrieve("how are indexes built?", 3)
        second = retriever.retrieve("partition keys", 3, mode="bm25")
    store.close()
    assert first.mode == second.mode == "dense" and first.hits
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("rag.")]
    by_logger = {name: [r for r in warnings if r.name == name] for name in ("rag.store", "rag.retriever")}
    assert len(by_logger["rag.store"]) == 1 and "falls back to dense" in by_logger["rag.store"][0].getMessage()
    assert len(by_logger["rag.retriever"]) == 1  # once per retriever, not once per question


def test_e5_and_minilm_collections_never_mix(small_corpus: Path, milvus_uri: str, embedder):
    """Both models are 384-d, so only the recorded embedder id tells their vectors apart."""
    from rag.embedder import E5Embedder

    e5 = E5Embedder(num_threads=1)
    assert e5.dim == embedder.dim
    for first, second in ((embedder, e5), (e5, embedder)):
        name = f"c_{first.model_id[:5].replace('-', '_').replace('/', '_')}"
        store = MilvusStore(milvus_uri, name)
        try:
            store.ensure(first)
            with pytest.raises(StoreError, match=r"embedder .*--recreate") as err:
                store.check_compatible(second)
            assert second.model_id in str(err.value)
            with pytest.raises(StoreError):
                store.open_existing(second)
        finally:
            store.close()


def _h(i: str) -> Hit:
    return Hit(id=i, score=0.0, text=i, source=f"{i}.md", header_path="", chunk_index=0)


def test_weighted_rrf_by_hand():
    dense, lexical = [_h("a"), _h("b"), _h("c")], [_h("c"), _h("d")]
    fused = weighted_rrf([(1.0, dense), (0.5, lexical)], rrf_k=10, k=4)
    # c: 1/13 + 0.5/11 = 0.1224; a: 1/11 = 0.0909; b: 1/12 = 0.0833; d: 0.5/12 = 0.0417
    assert [h.id for h in fused] == ["c", "a", "b", "d"]
    assert fused[0].score == pytest.approx(1 / 13 + 0.5 / 11)
    # Equal weights: plain RRF, where c's two mid ranks beat a's single first rank too.
    assert [h.id for h in weighted_rrf([(1.0, dense), (1.0, lexical)], 10, 2)] == ["c", "a"]


def test_unequal_weights_fuse_both_routes_with_similarities(milvus_uri: str):
    store = _store_with(milvus_uri, "jieba")
    emb = HashEmbedder(16, per_char=True)
    try:
        question = "数据 存储 公园"
        weighted = Retriever(store, emb, mode="hybrid", weights=(1.0, 0.3)).retrieve(question, 3)
        vec = emb.embed_query(question)
        expected = weighted_rrf([(1.0, store.search_dense(vec, 20)), (0.3, store.search_bm25(question, 20))], 10, 3)
        assert [h.id for h in weighted.hits] == [h.id for h in expected]
        assert all(h.similarity is not None for h in weighted.hits)  # the score floor still applies
        plain = Retriever(store, emb, mode="hybrid").retrieve(question, 3)  # HashEmbedder: (1, 1)
        assert plain.mode == "hybrid" and len(plain.hits) == 3
    finally:
        store.close()
