"""Question -> embedding -> Milvus search (dense, BM25 or hybrid) -> [rerank] -> hits, with timings."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from rag.embedder import Embedder
from rag.store import MilvusStore
from rag.types import Hit

log = logging.getLogger(__name__)


@runtime_checkable
class Reranker(Protocol):
    """Second stage: scores (question, passage) pairs jointly, e.g. a cross-encoder.

    No implementation ships: no pip-installable package carries cross-encoder weights that
    load offline (flashrank, for one, downloads its ONNX files from a hub at first use), and a
    reranker must be a real model. Plug one in with `Retriever(..., reranker=...)`.
    """

    model_id: str

    def score(self, question: str, passages: Sequence[str]) -> Sequence[float]:
        """One relevance score per passage, higher is better."""
        ...


@dataclasses.dataclass
class Retrieval:
    hits: list[Hit]
    mode: str  # the mode actually used (hybrid falls back to dense without BM25)
    embed_ms: float
    search_ms: float


class Retriever:
    """Runs one query against one collection. Stateless apart from its handles."""

    def __init__(
        self, store: MilvusStore, embedder: Embedder, mode: str = "dense", rrf_k: int = 10,
        weights: tuple[float, float] | None = None, candidates: int | None = None,
        reranker: Reranker | None = None, rerank_depth: int = 20,
    ):
        self.store = store
        self.embedder = embedder
        self.mode = mode
        self.rrf_k = rrf_k
        self.weights = weights  # (dense, bm25) for a WeightedRanker; None fuses by RRF
        self.candidates = candidates  # hits per route before fusion; None lets the store pick
        self.reranker = reranker
        self.rerank_depth = rerank_depth  # first-stage hits the reranker re-orders
        self._warned = False

    def _effective_mode(self, mode: str) -> str:
        if mode != "dense" and not self.store.bm25:
            if not self._warned:
                log.warning("collection %r has no BM25 field; using dense retrieval", self.store.collection)
                self._warned = True
            return "dense"
        return mode

    def retrieve(self, question: str, k: int, filter: str = "", mode: str | None = None) -> Retrieval:
        """Top-k hits for `question`; `filter` is a Milvus boolean expression, e.g. `source like "docs/%"`."""
        mode = self._effective_mode(mode or self.mode)
        n = max(k, self.rerank_depth) if self.reranker else k
        t0 = time.perf_counter()
        vec = self.embedder.embed_query(question) if mode != "bm25" else None
        t1 = time.perf_counter()
        if mode == "dense":
            hits = self.store.search_dense(vec, n, filter)
        elif mode == "bm25":
            hits = self.store.search_bm25(question, n, filter)
        else:
            hits = self.store.search_hybrid(
                vec, question, n, filter, rrf_k=self.rrf_k, weights=self.weights, candidates=self.candidates,
            )
        if self.reranker and hits:
            scores = self.reranker.score(question, [h.text for h in hits])
            hits = [dataclasses.replace(h, score=float(s)) for s, h in sorted(
                zip(scores, hits, strict=True), key=lambda p: -p[0])][:k]
        hits = [dataclasses.replace(h, rank=i, mode=mode) for i, h in enumerate(hits, 1)]
        t2 = time.perf_counter()
        return Retrieval(hits, mode, (t1 - t0) * 1e3, (t2 - t1) * 1e3)
