"""A real implementation of our Embedder protocol with deterministic hash vectors.

A test double of our own interface (not a mock of Milvus or a model): tests that need vectors
of some shape and model id, not meaning, build collections with it in milliseconds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


class HashEmbedder:
    score_floor = 0.0
    rrf_weights = (1.0, 1.0)
    heading_weight = 0.0  # no heading route: these tests fuse dense and BM25 only
    max_tokens = 256
    loaded = True  # nothing to load

    def load(self) -> None:
        pass

    def __init__(self, dim: int = 8, model_id: str | None = None, per_char: bool = False):
        self.dim = dim
        self.model_id = model_id or f"test/hash-{dim}d"
        self.per_char = per_char  # count characters, for CJK text without spaces

    def count_tokens(self, text: str) -> int:
        return (len(text) if self.per_char else len(text.split())) + 2

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_documents([text])[0]
