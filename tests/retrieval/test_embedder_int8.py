"""RAG_EMBED_INT8 (on by default): MiniLM int8 for new collections on the CPU, through ONNX Runtime
(RAG_EMBED_ONNX, on by default: rag/minilm_onnx.py) or torch's dynamic quantization (per output
channel) of its linear layers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rag.config import RagConfig
from rag.embedder import MiniLMEmbedder, make_embedder
from rag.minilm_onnx import MISSING, OnnxMiniLM, OnnxRuntimeMissing, export_fp32, onnx_path, weights_hash

TEXTS = [
    "Milvus keeps inserted data as incremental logs in object storage and metadata in etcd.",
    "Indexes such as HNSW and IVF_FLAT are built per segment; nlist and nprobe trade recall for speed.",
    "A partition key routes entities to partitions so that a search can skip the others.",
    "How does incremental ingest decide which files to re-embed?",
]
# Past the 256-token limit: both paths must truncate it the same way.
LONG = " ".join(f"segment {i} holds sealed binlogs and a growing buffer." for i in range(60))


def _close_to(q: np.ndarray, ref: np.ndarray, floor: float) -> None:
    assert q.shape == ref.shape and np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    cos = (q * ref).sum(axis=1)
    assert cos.min() > floor, cos
    # Retrieval order survives: each text's nearest neighbour among the fp32 vectors is itself.
    assert list(np.argmax(q @ ref.T, axis=1)) == list(range(len(ref)))


def test_torch_int8_with_onnx_off_is_close_to_fp32(embedder):
    assert make_embedder(RagConfig.load(environ={"RAG_EMBED_INT8": "0"}), "minilm").int8 is False
    int8 = make_embedder(RagConfig.load(environ={"RAG_EMBED_ONNX": "0"}, device="cpu"), "minilm")
    assert isinstance(int8, MiniLMEmbedder) and int8.int8 and not int8.onnx
    assert int8.model_id == MiniLMEmbedder.INT8_ID != embedder.model_id  # recorded apart: never mixed
    linears = [m for m in int8.model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears  # every linear layer was swapped for its quantized version
    # per tensor (the first try) gave 0.87-0.92
    _close_to(int8.embed_documents(TEXTS), embedder.embed_documents(TEXTS), 0.95)


def test_onnx_int8_is_the_cpu_default_built_once_into_the_cache(embedder, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    q = make_embedder(RagConfig.load(environ={}, device="cpu"), "minilm")
    assert isinstance(q, MiniLMEmbedder) and q.int8 and q.onnx
    assert q.model_id == MiniLMEmbedder.ONNX_INT8_ID  # its own id: never mixed with torch's int8 or fp32
    # Measured 0.993 mean / 0.987 min on 256 SciFact chunks (docs/benchmarks.md); torch's int8 0.98.
    _close_to(q.embed_documents([*TEXTS, LONG]), embedder.embed_documents([*TEXTS, LONG]), 0.98)
    # Activations scale per call (the whole batch, padding included), so a question embedded alone
    # moves a little from the same text in a batch (cosine 0.989 here); it stays close to fp32's.
    for text in TEXTS:
        assert float(q.embed_query(text) @ embedder.embed_query(text)) > 0.98, text
    # One file in the cache, named by the package weights' hash (an upgrade rebuilds); no temp left.
    built = sorted(p.name for p in (tmp_path / "rag").iterdir())
    assert built == [onnx_path(q._dir).name] and weights_hash(q._dir) in built[0]
    # Off: torch's int8 again, for new collections.
    assert make_embedder(RagConfig.load(environ={"RAG_EMBED_ONNX": "0"}, device="cpu"), "minilm").onnx is False


def test_onnx_pooling_and_truncation_match_sentence_transformers(embedder, tmp_path: Path):
    """The same encoder unquantized through ORT: any gap would be tokenizer, truncation or pooling."""
    fp32 = tmp_path / "fp32.onnx"
    export_fp32(embedder._dir, fp32)
    got = OnnxMiniLM(embedder._dir, embedder.max_tokens, path=fp32).embed([*TEXTS, LONG, "x"])
    assert np.allclose(got, embedder.embed_documents([*TEXTS, LONG, "x"]), atol=2e-5)


def test_missing_onnxruntime_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    q = MiniLMEmbedder(device="cpu", int8=True, onnx=True)
    with pytest.raises(OnnxRuntimeMissing, match="pip install onnxruntime onnx") as e:
        q.model_id  # noqa: B018  (read before any collection records it)
    assert str(e.value) == MISSING and "\n" not in MISSING
