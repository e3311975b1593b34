"""Retrieval metrics, as BEIR / pytrec_eval define them, so numbers compare with published baselines:
- nDCG@k: graded gains, DCG = sum(rel_i / log2(i + 1)) over ranks i = 1..k, divided by the
  ideal DCG of the query's judged documents (relevance > 0) sorted by relevance;
- recall@k: judged-relevant documents in the top k over all judged-relevant documents;
- MRR@k: 1 / rank of the first relevant document within the top k, else 0;
- hit@k (QA files): 1 when any of the top k passages is a gold passage.
Every number is the mean over queries that have at least one relevant document.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from rag.types import Hit

Qrels = Mapping[str, Mapping[str, int]]  # query id -> doc id -> graded relevance
Run = Mapping[str, Sequence[str]]  # query id -> doc ids, best first


def dcg(gains: Iterable[float]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def ndcg_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    ideal = dcg(sorted((r for r in rels.values() if r > 0), reverse=True)[:k])
    if ideal == 0:
        return 0.0
    return dcg(max(rels.get(d, 0), 0) for d in ranked[:k]) / ideal


def recall_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def mrr_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    for i, d in enumerate(ranked[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def hit_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    return 1.0 if any(rels.get(d, 0) > 0 for d in ranked[:k]) else 0.0


BEIR_METRICS = ("ndcg@10", "recall@1", "recall@5", "recall@10", "recall@100", "mrr@10")
QA_METRICS = ("hit@1", "hit@3", "hit@5", "hit@10", "mrr@10")
_FUNCS = {"ndcg": ndcg_at_k, "recall": recall_at_k, "mrr": mrr_at_k, "hit": hit_at_k}


def evaluate(run: Run, qrels: Qrels, metrics: Sequence[str] = BEIR_METRICS) -> dict[str, float]:
    """Mean of each `name@k` metric over the judged queries (a query missing from `run` scores 0)."""
    qids = [q for q, rels in qrels.items() if any(r > 0 for r in rels.values())]
    out: dict[str, float] = {}
    for m in metrics:
        name, k = m.split("@")
        f = _FUNCS[name]
        out[m] = sum(f(run.get(q, ()), qrels[q], int(k)) for q in qids) / len(qids) if qids else 0.0
    return out


def max_per_key(hits: Sequence[Hit], key) -> list[str]:
    """Collapse chunk hits to a ranking of keys (doc ids), each at its best chunk's score.

    A long document becomes several chunks; scoring it by its best chunk (max-P) is the usual
    passage-level aggregation and keeps one document from filling the top k.
    """
    best: dict[str, float] = {}
    for h in hits:
        k = key(h)
        if k not in best or h.score > best[k]:
            best[k] = h.score
    return sorted(best, key=lambda d: -best[d])
