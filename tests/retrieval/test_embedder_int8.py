"""RAG_EMBED_INT8 (on by default): MiniLM with int8 dynamic quantization (per output channel) of its
linear layers, for new collections on the CPU."""

from __future__ import annotations

import numpy as np
import torch

from rag.config import RagConfig
from rag.embedder import MiniLMEmbedder, make_embedder

TEXTS = [
    "Milvus keeps inserted data as incremental logs in object storage and metadata in etcd.",
    "Indexes such as HNSW and IVF_FLAT are built per segment; nlist and nprobe trade recall for speed.",
    "A partition key routes entities to partitions so that a search can skip the others.",
    "How does incremental ingest decide which files to re-embed?",
]


def test_int8_is_the_cpu_default_and_close_to_fp32(embedder):
    assert make_embedder(RagConfig.load(environ={"RAG_EMBED_INT8": "0"}), "minilm").int8 is False
    int8 = make_embedder(RagConfig.load(environ={}, device="cpu"), "minilm")
    assert isinstance(int8, MiniLMEmbedder) and int8.int8
    assert int8.model_id == MiniLMEmbedder.INT8_ID != embedder.model_id  # recorded apart: never mixed
    linears = [m for m in int8.model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears  # every linear layer was swapped for its quantized version
    ref, q = embedder.embed_documents(TEXTS), int8.embed_documents(TEXTS)
    assert q.shape == ref.shape and np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    cos = (q * ref).sum(axis=1)
    assert cos.min() > 0.95, cos  # per tensor (the first try) gave 0.87-0.92
    # Retrieval order survives: each text's nearest neighbour among the fp32 vectors is itself.
    assert list(np.argmax(q @ ref.T, axis=1)) == list(range(len(TEXTS)))
