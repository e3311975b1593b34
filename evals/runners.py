"""Run retrieval evaluations: index a BEIR corpus through the real chunker, embedder and store,
then score dense, BM25 and hybrid retrieval; or score a QA file against a collection.

A BEIR document becomes one markdown document (`# title`, then the text with one sentence per
paragraph), so it is chunked as an ingested file would be: the title is the header path that
every chunk of a long abstract carries into its embedding, and chunks end at sentence ends
(an abstract is one long paragraph; cut anywhere else, a chunk would start mid-sentence).
Each chunk keeps the BEIR id as its `source` (and in `metadata.doc_id`), and a document
scores as its best chunk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from evals.datasets import BeirData, QAItem, qa_ranking
from evals.metrics import BEIR_METRICS, QA_METRICS, evaluate, max_per_key
from ingest.chunker import Chunker
from ingest.loader import Document
from rag import adapter
from rag.embedder import Embedder
from rag.retriever import Retriever
from rag.store import MilvusStore
from rag.types import Chunk

MODES = ("dense", "bm25", "hybrid")
# A sentence ends at . ! or ? followed by space and an upper-case letter, digit or bracket.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


@dataclasses.dataclass
class IndexStats:
    docs: int = 0
    chunks: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0

    @property
    def chunks_per_second(self) -> float:
        return self.chunks / self.embed_seconds if self.embed_seconds else 0.0


@dataclasses.dataclass
class ModeResult:
    mode: str  # asked for
    used: str  # actually run (hybrid and bm25 fall back to dense without BM25)
    metrics: dict[str, float]
    queries: int
    seconds: float

    @property
    def ms_per_query(self) -> float:
        return 1e3 * self.seconds / self.queries if self.queries else 0.0


def beir_document(doc_id: str, doc: dict[str, str]) -> Document:
    """A BEIR record as the markdown document the loader would have produced."""
    title = " ".join(doc.get("title", "").split())  # a heading is one line
    body = "\n\n".join(s for s in SENTENCE_END.split(doc.get("text", "").strip()) if s)
    text = f"# {title}\n\n{body}\n" if title else f"{body}\n"
    return Document(doc_id, text, 0, hashlib.sha256(text.encode()).hexdigest(), {})


def index_beir(
    corpus: dict[str, dict[str, str]],
    store: MilvusStore,
    embedder: Embedder,
    chunk_size: int = 256,
    chunk_overlap: int = 32,
    batch: int = 256,
    progress: bool = True,
) -> IndexStats:
    """Chunk, embed and upsert every document; the store must be `ensure`d already."""
    t0 = time.perf_counter()
    chunker = Chunker(embedder.count_tokens, embedder.max_tokens, chunk_size, chunk_overlap)
    chunks: list[Chunk] = []
    for doc_id, doc in tqdm(corpus.items(), desc="chunking", unit="doc", disable=not progress, leave=False):
        for c in chunker.chunk(beir_document(doc_id, doc)):
            chunks.append(dataclasses.replace(c, metadata={"doc_id": doc_id}))
    stats = IndexStats(docs=len(corpus), chunks=len(chunks))
    # Embedding longest-first in big batches keeps padding waste low and the bar honest.
    order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i].text))
    bar = tqdm(total=len(chunks), desc=f"embedding ({type(embedder).__name__})", unit="chunk", disable=not progress)
    for i in range(0, len(order), batch):
        part = [chunks[j] for j in order[i : i + batch]]
        te = time.perf_counter()
        vecs = embedder.embed_documents([chunker.embed_text(c) for c in part])
        stats.embed_seconds += time.perf_counter() - te
        store.upsert(part, vecs, embedder.model_id)
        bar.update(len(part))
    bar.close()
    store.flush()  # Milvus Lite searches a flushed segment ~30x faster than its memtable
    adapter.fit_and_save(store)  # the query adapter, as rag-ingest fits it
    stats.seconds = time.perf_counter() - t0
    return stats


def run_queries(
    queries: dict[str, str],
    retriever: Retriever,
    mode: str,
    k: int,
    rank: Callable[[str, list], Any],
    progress: bool = True,
) -> tuple[dict[str, Any], str, float]:
    """Retrieve top-k chunks for every query; `rank(qid, hits)` turns hits into what is scored."""
    out: dict[str, Any] = {}
    used = mode
    t0 = time.perf_counter()
    for qid, text in tqdm(queries.items(), desc=f"{mode:>6}", unit="q", disable=not progress, leave=False):
        r = retriever.retrieve(text, k, mode=mode)
        used = r.mode
        out[qid] = rank(qid, r.hits)
    return out, used, time.perf_counter() - t0


def eval_beir(
    data: BeirData,
    store: MilvusStore,
    embedder: Embedder,
    modes: Sequence[str] = MODES,
    depth: int = 100,
    chunk_depth: int | None = None,
    retriever_opts: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[ModeResult]:
    """Score each mode on an indexed BEIR corpus.

    `depth` documents are scored (recall@100 needs 100); since a document may have several
    chunks, `chunk_depth` chunks are retrieved (default 2 x depth) before max-per-doc.
    """
    chunk_depth = chunk_depth or 2 * depth
    opts = dict(retriever_opts or {})
    # Hybrid needs chunk_depth fused hits, so each route must return at least that many; more
    # changed nothing on the SciFact train split and costs query time.
    opts["candidates"] = opts.get("candidates") or chunk_depth
    retriever = Retriever(store, embedder, **opts)
    results = []
    for mode in modes:
        run, used, secs = run_queries(
            data.queries, retriever, mode, chunk_depth,
            lambda _q, hits: max_per_key(hits, lambda h: h.metadata.get("doc_id", h.source))[:depth],
            progress,
        )
        results.append(ModeResult(mode, used, evaluate(run, data.qrels, BEIR_METRICS), len(run), secs))
    return results


def eval_qa(
    items: Sequence[QAItem],
    store: MilvusStore,
    embedder: Embedder,
    modes: Sequence[str] = MODES,
    k: int = 10,
    retriever_opts: dict[str, Any] | None = None,
    progress: bool = True,
    match: str = "any",
) -> tuple[list[ModeResult], dict[str, dict[str, int | None]]]:
    """hit@k and MRR of each mode; also the rank (1-based, None = missed) of the first gold per item.

    `match` is how a hit's span must meet a gold span: `any` overlap or `exact` (see `matches`).
    """
    retriever = Retriever(store, embedder, **(retriever_opts or {}))
    by_id = {it.id: it for it in items}
    queries = {it.id: it.question for it in items}
    results, ranks = [], {}
    for mode in modes:
        judged, used, secs = run_queries(queries, retriever, mode, k, lambda q, hits: qa_ranking(hits, by_id[q], match),
                                         progress)
        run = {q: ranked for q, (ranked, _) in judged.items()}
        qrels = {q: rels for q, (_, rels) in judged.items()}
        results.append(ModeResult(mode, used, evaluate(run, qrels, QA_METRICS), len(run), secs))
        ranks[mode] = {
            q: next((i + 1 for i, d in enumerate(run[q]) if d.endswith(":gold")), None) for q in run
        }
    return results, ranks
