"""MiniLM's variants (fp32, torch int8, ONNX Runtime int8) each record their own id: a collection is
always embedded the way it was built, whatever the defaults for new collections say."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ingest.config import IngestConfig
from ingest.pipeline import ingest
from rag.config import RagConfig
from rag.embedder import MiniLMEmbedder, make_embedder, resolve_name
from rag.store import MilvusStore
from tests.rag_core.conftest import open_store, rows


def _ingest_as_configured(paths: list[Path], uri: str, int8: str, onnx: str | None = None) -> None:
    """rag-ingest's own route: the embedder is chosen from the settings and the collection's record.
    `onnx` None leaves RAG_EMBED_ONNX unset (its default)."""
    environ = {"RAG_EMBED_INT8": int8} | ({"RAG_EMBED_ONNX": onnx} if onnx is not None else {})
    rag_config = RagConfig.load(environ=environ, milvus_uri=uri, collection="docs", device="cpu")
    ingest([str(p) for p in paths], rag_config, IngestConfig.load(environ={}), progress=False, warn=lambda _m: None)


def _recorded(uri: str) -> str | None:
    store = MilvusStore(uri, "docs")
    try:
        return store.recorded_embedder()
    finally:
        store.close()


def test_fp32_collection_stays_fp32_when_int8_is_on(small_corpus: Path, milvus_uri: str, embedder):
    _ingest_as_configured([small_corpus], milvus_uri, int8="0")
    assert _recorded(milvus_uri) == MiniLMEmbedder.FP32_ID
    # A copy of alpha.md added later, with int8 switched on: same chunk texts, so the new rows must
    # carry exactly the fp32 vectors of the old ones (int8 ones differ: cosine about 0.98).
    shutil.copy(small_corpus / "alpha.md", small_corpus / "alpha_copy.md")
    _ingest_as_configured([small_corpus], milvus_uri, int8="1")
    assert _recorded(milvus_uri) == MiniLMEmbedder.FP32_ID
    store = open_store(milvus_uri, embedder)
    try:
        got = rows(store)
    finally:
        store.close()
    old = {r["text"]: np.asarray(r["vector"]) for r in got.values() if r["source"].endswith("/alpha.md")}
    new = {r["text"]: np.asarray(r["vector"]) for r in got.values() if r["source"].endswith("alpha_copy.md")}
    assert old and new.keys() == old.keys()
    for text, vec in new.items():
        assert float(vec @ old[text]) > 0.99999, text

    # Questions to it are embedded the fp32 way too, whatever RAG_EMBED_INT8 says.
    config = RagConfig.load(environ={"RAG_EMBED_INT8": "1"}, device="cpu")
    for name in ("auto", "minilm"):
        q = make_embedder(config, resolve_name(name, MiniLMEmbedder.FP32_ID))
        assert q.model_id == MiniLMEmbedder.FP32_ID and not q.int8
        assert np.allclose(q.embed_query("how are indexes built?"), embedder.embed_query("how are indexes built?"),
                           atol=1e-5)


def test_new_collection_gets_torch_int8_with_onnx_off_and_keeps_it(small_corpus: Path, milvus_uri: str):
    _ingest_as_configured([small_corpus], milvus_uri, int8="1", onnx="0")
    assert _recorded(milvus_uri) == MiniLMEmbedder.INT8_ID
    # Later runs with int8 switched off still embed this collection as int8.
    q = make_embedder(RagConfig.load(environ={"RAG_EMBED_INT8": "0"}, device="cpu"),
                      resolve_name("minilm", MiniLMEmbedder.INT8_ID))
    assert q.int8 and q.model_id == MiniLMEmbedder.INT8_ID
    _open_existing(milvus_uri, q)


def _open_existing(uri: str, embedder) -> None:
    """Open the collection with ``embedder``: MilvusStore raises when the recorded ids differ."""
    store = MilvusStore(uri, "docs")
    try:
        store.open_existing(embedder)
    finally:
        store.close()


def _vectors_by_text(uri: str, embedder: MiniLMEmbedder, suffix: str) -> dict[str, np.ndarray]:
    store = open_store(uri, embedder)
    try:
        got = rows(store)
    finally:
        store.close()
    return {r["text"]: np.asarray(r["vector"]) for r in got.values() if r["source"].endswith(suffix)}


def test_torch_int8_collection_stays_torch_int8_when_onnx_is_the_default(small_corpus: Path, milvus_uri: str):
    _ingest_as_configured([small_corpus / "alpha.md"], milvus_uri, int8="1", onnx="0")
    assert _recorded(milvus_uri) == MiniLMEmbedder.INT8_ID
    # A copy added with the defaults (ONNX on): its rows must be torch int8 vectors, like the old
    # ones (ORT int8 ones differ from them: cosine about 0.97). One file per run, so both runs embed
    # the same batch: int8 activations scale per batch, and only the same batch gives the same vectors.
    shutil.copy(small_corpus / "alpha.md", small_corpus / "alpha_copy.md")
    _ingest_as_configured([small_corpus / "alpha_copy.md"], milvus_uri, int8="1")
    assert _recorded(milvus_uri) == MiniLMEmbedder.INT8_ID
    torch_int8 = MiniLMEmbedder(device="cpu", int8=True)
    old = _vectors_by_text(milvus_uri, torch_int8, "/alpha.md")
    new = _vectors_by_text(milvus_uri, torch_int8, "alpha_copy.md")
    assert old and new.keys() == old.keys()
    for text, vec in new.items():
        assert float(vec @ old[text]) > 0.9999, text


def test_new_collection_gets_onnx_int8_by_default_and_keeps_it(small_corpus: Path, milvus_uri: str):
    _ingest_as_configured([small_corpus], milvus_uri, int8="1")
    assert _recorded(milvus_uri) == MiniLMEmbedder.ONNX_INT8_ID  # torch's INT8_ID before ONNX became the default
    # Later runs with ONNX (or int8) switched off still embed this collection through ORT int8.
    for environ in ({"RAG_EMBED_ONNX": "0"}, {"RAG_EMBED_INT8": "0"}):
        q = make_embedder(RagConfig.load(environ=environ, device="cpu"),
                          resolve_name("minilm", MiniLMEmbedder.ONNX_INT8_ID))
        assert q.onnx and q.model_id == MiniLMEmbedder.ONNX_INT8_ID
    _open_existing(milvus_uri, q)
