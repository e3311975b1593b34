"""Question -> embedding -> Milvus search (dense, BM25 or hybrid) -> hits, with timings."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import numpy as np

from rag import adapter
from rag.embedder import Embedder
from rag.rerank import HydeWriter, Reranker
from rag.store import MilvusStore
from rag.types import Hit

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Retrieval:
    hits: list[Hit]
    mode: str  # the mode actually used (hybrid falls back to dense without BM25)
    embed_ms: float
    search_ms: float
    rerank_ms: float = 0.0  # LLM rerank and HyDE time (0 when they are off)


def weighted_rrf(lists: Sequence[tuple[float, Sequence[Hit]]], rrf_k: int, k: int) -> list[Hit]:
    """Reciprocal-rank fusion with a weight per list: a hit scores sum(w / (rrf_k + rank)).

    With equal weights this is Milvus' RRFRanker; a smaller BM25 weight lets BM25 reorder close
    dense candidates without pulling in passages that only share words with the question.
    """
    fused: dict[str, float] = {}
    first: dict[str, Hit] = {}
    for weight, hits in lists:
        for rank, h in enumerate(hits, 1):
            fused[h.id] = fused.get(h.id, 0.0) + weight / (rrf_k + rank)
            first.setdefault(h.id, h)
    best = sorted(fused, key=lambda i: -fused[i])[:k]
    return [dataclasses.replace(first[i], score=fused[i]) for i in best]


COLLAPSE_OVERFETCH = 3  # candidates fetched per wanted hit when collapsing sections


def collapse_sections(hits: Sequence[Hit]) -> list[Hit]:
    """Keep each section's best-ranked hit, in order; a section is (source, heading path)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for h in hits:
        key = (h.source, h.header_path)
        if key not in seen:
            seen.add(key)
            out.append(h)
    return out


class Retriever:
    """Runs one query against one collection. Stateless apart from its handles."""

    def __init__(
        self, store: MilvusStore, embedder: Embedder, mode: str = "dense", rrf_k: int = 10,
        weights: tuple[float, float] | None = None, candidates: int | None = None, collapse: bool = False,
        reranker: Reranker | None = None, rerank_candidates: int = 20, hyde: HydeWriter | None = None,
        heading_weight: float | None = None, query_adapter: bool = True,
    ):
        self.store = store
        self.embedder = embedder
        self.mode = mode
        self.rrf_k = rrf_k
        # (dense, bm25) weights of the fusion; None takes the embedder's measured ones.
        self.weights = weights or embedder.rrf_weights
        # Weight of the heading route (question vs each chunk's own heading) in hybrid fusion;
        # None takes the embedder's measured one (0: off). Only collections with the heading
        # vector have the route (`store.heading`); others fuse dense and BM25 as before.
        self.heading_weight = embedder.heading_weight if heading_weight is None else heading_weight
        self.candidates = candidates  # hits per route before fusion; None lets the store pick
        # One hit per section (source + heading path): a long section's chunks would otherwise
        # fill several of the k slots, crowding out other sections that may hold the answer.
        self.collapse = collapse
        self.reranker = reranker  # reorders the top `rerank_candidates` first-stage hits
        self.rerank_candidates = rerank_candidates
        self.hyde = hyde  # adds an LLM-written answer passage to the query vector
        # Hybrid mode searches the dense and heading routes with the question's vector mapped by
        # the collection's query adapter (rag/adapter.py), where ingest fitted one.
        self.query_adapter = query_adapter
        self._adapter: np.ndarray | None = None
        self._adapter_read = False
        self._warned = False

    def _effective_mode(self, mode: str) -> str:
        if mode != "dense" and not self.store.bm25:
            if not self._warned:
                log.warning("collection %r has no BM25 field; using dense retrieval", self.store.collection)
                self._warned = True
            return "dense"
        return mode

    def _query_adapter(self) -> np.ndarray | None:
        """The collection's query adapter, read once; None where it has none or it is off."""
        if self.query_adapter and not self._adapter_read:
            self._adapter = adapter.load(self.store, self.embedder.dim)
            self._adapter_read = True
        return self._adapter if self.query_adapter else None

    def _hybrid(self, vec, question: str, k: int, filter: str, depth: int) -> list[Hit]:
        dense_w, bm25_w = self.weights
        heading_w = self.heading_weight if self.store.heading else 0.0
        if dense_w == bm25_w and not heading_w:  # plain RRF: one request, fused inside Milvus
            return self.store.search_hybrid(vec, question, k, filter, rrf_k=self.rrf_k, candidates=self.candidates)
        n = self.candidates or depth
        w = self._query_adapter()
        # Searched with the adapted vector; similarities (score floor) stay the question's own.
        near, own = (adapter.apply(w, vec), vec) if w is not None else (vec, None)
        lists = [(dense_w, self.store.search_dense(near, n, filter, query=own)),
                 (bm25_w, self.store.search_bm25(question, n, filter, query=vec))]
        if heading_w:
            lists.append((heading_w, self.store.search_heading(near, n, filter, query=own)))
        return weighted_rrf(lists, self.rrf_k, k)

    def retrieve(self, question: str, k: int, filter: str = "", mode: str | None = None) -> Retrieval:
        """Top-k hits for `question`; `filter` is a Milvus boolean expression, e.g. `source like "docs/%"`."""
        mode = self._effective_mode(mode or self.mode)
        t0 = time.perf_counter()
        vec = self.embedder.embed_query(question) if mode != "bm25" else None
        llm_ms = 0.0
        if vec is not None and self.hyde is not None:
            tl = time.perf_counter()
            passage = self.hyde.passage(question)
            llm_ms += (time.perf_counter() - tl) * 1e3
            if passage:
                both = vec + self.embedder.embed_documents([passage])[0]
                vec = both / np.linalg.norm(both)
        t1 = time.perf_counter()
        want = max(k, self.rerank_candidates) if self.reranker else k
        n = want * COLLAPSE_OVERFETCH if self.collapse else want
        if mode == "dense":
            hits = self.store.search_dense(vec, n, filter)
        elif mode == "bm25":
            hits = self.store.search_bm25(question, n, filter)
        else:
            # Route depth follows the k asked for, so collapsing changes no fused score.
            hits = self._hybrid(vec, question, n, filter, depth=max(want * 4, 20))
        if self.collapse:
            hits = collapse_sections(hits)
        hits = hits[:want]
        t2 = time.perf_counter()
        if self.reranker is not None:
            hits = self.reranker.rerank(question, hits, k)
            llm_ms += (time.perf_counter() - t2) * 1e3
        hits = [dataclasses.replace(h, rank=i, mode=mode) for i, h in enumerate(hits[:k], 1)]
        search_ms = (t2 - t1) * 1e3
        return Retrieval(hits, mode, (t1 - t0) * 1e3 - (llm_ms if self.hyde else 0.0), search_ms, llm_ms)
