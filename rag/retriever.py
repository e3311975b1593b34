"""Question -> embedding -> Milvus search (dense, BM25 or hybrid) -> hits, with timings."""

from __future__ import annotations

import dataclasses
import logging
import time

from rag.embedder import Embedder
from rag.store import MilvusStore
from rag.types import Hit

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Retrieval:
    hits: list[Hit]
    mode: str  # the mode actually used (hybrid falls back to dense without BM25)
    embed_ms: float
    search_ms: float


class Retriever:
    """Runs one query against one collection. Stateless apart from its handles."""

    def __init__(self, store: MilvusStore, embedder: Embedder, mode: str = "dense", rrf_k: int = 60):
        self.store = store
        self.embedder = embedder
        self.mode = mode
        self.rrf_k = rrf_k
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
        t0 = time.perf_counter()
        vec = self.embedder.embed_query(question) if mode != "bm25" else None
        t1 = time.perf_counter()
        if mode == "dense":
            hits = self.store.search_dense(vec, k, filter)
        elif mode == "bm25":
            hits = self.store.search_bm25(question, k, filter)
        else:
            hits = self.store.search_hybrid(vec, question, k, filter, rrf_k=self.rrf_k)
        t2 = time.perf_counter()
        return Retrieval(hits, mode, (t1 - t0) * 1e3, (t2 - t1) * 1e3)
