"""Retrieval development sets (issue 19): paraphrased questions over the shared docs, en and zh.

    python bench/retrieval_dev.py en --embedder minilm                 # dev split, all modes
    python bench/retrieval_dev.py zh --embedder e5 --split heldout     # only once tuning is done
    python bench/retrieval_dev.py en --embedder minilm --analyzer english --weights 0.7,0.3
    DEEPSEEK_API_KEY=... python bench/retrieval_dev.py en --embedder minilm --modes hybrid --rerank llm [--hyde]

en: the whole English Milvus docs tree (shared/data/milvus_docs_en), 50 questions written as a
user would ask them, each the paraphrase of one FAQ entry (bench/en_paraphrases.jsonl; no
question repeats its heading's wording). zh: the FAQ folders of the Milvus v2.0 zh-CN docs and
of the TiDB docs (15 files: e5 embeds ~1 chunk/s on a loaded 2-core machine, so the whole
zh tree did not fit a session), 49 paraphrased questions (bench/zh_questions.jsonl). The corpus is indexed as it is, headings
included; a passage is gold when it lies in the question's FAQ section. Every third question
is held out (`"split": "heldout"` in en; line numbers divisible by 3 in zh): tune on `dev`,
report `heldout` once.

Chunk and query embeddings are cached on disk (--cache), keyed by model and text, so variants
that change only the BM25 side or the fusion re-index in seconds; embeddings are exact, so the
numbers are the ones a fresh ingest gives.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evals.datasets import Gold, QAItem  # noqa: E402
from evals.runners import eval_qa  # noqa: E402
from ingest.config import IngestConfig  # noqa: E402
from ingest.pipeline import ingest  # noqa: E402
from rag.config import RagConfig  # noqa: E402
from rag.embedder import make_embedder  # noqa: E402
from rag.llm import LLMClient  # noqa: E402
from rag.rerank import llm_stages  # noqa: E402
from rag.store import MilvusStore  # noqa: E402

SHARED = Path(os.environ.get("RAG_SHARED_DATA", REPO.parent / "shared" / "data"))
SETS = {  # name: (questions file, corpus folders)
    "en": (REPO / "bench" / "en_paraphrases.jsonl", [SHARED / "milvus_docs_en"]),
    "zh": (REPO / "bench" / "zh_questions.jsonl",
           [SHARED / "zh_docs" / "milvus_docs_v2.0.x_zh-CN" / "faq", SHARED / "zh_docs" / "pingcap_docs-cn_subset" / "faq"]),
}


class CachedEmbedder:
    """An embedder whose outputs are memoised on disk; identical vectors, no repeated work."""

    def __init__(self, inner, folder: Path):
        self.inner = inner
        self.model_id, self.dim, self.max_tokens = inner.model_id, inner.dim, inner.max_tokens
        self.score_floor, self.rrf_weights = inner.score_floor, inner.rrf_weights
        self.heading_weight = inner.heading_weight
        self.path = folder / (hashlib.sha1(inner.model_id.encode()).hexdigest()[:12] + ".pkl")
        self.memo: dict[str, np.ndarray] = pickle.loads(self.path.read_bytes()) if self.path.exists() else {}
        self.embed_seconds = 0.0
        self.computed = 0

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def _get(self, texts: Sequence[str], kind: str) -> np.ndarray:
        keys = [f"{kind}\0{t}" for t in texts]
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        if todo:
            t0 = time.perf_counter()
            if kind == "q":
                vecs = [self.inner.embed_query(texts[i]) for i in todo]
            else:
                vecs = list(self.inner.embed_documents([texts[i] for i in todo]))
            self.embed_seconds += time.perf_counter() - t0
            self.computed += len(todo)
            self.memo.update({keys[i]: np.asarray(v, dtype=np.float32) for i, v in zip(todo, vecs, strict=True)})
            self.save()
        return np.stack([self.memo[k] for k in keys]) if keys else np.empty((0, self.dim), np.float32)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(self.memo))
        tmp.replace(self.path)

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._get(texts, "d")

    def embed_query(self, text: str) -> np.ndarray:
        return self._get([text], "q")[0]


def load_items(which: str, split: str) -> list[QAItem]:
    path, _ = SETS[which]
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        d = json.loads(line)
        held = d.get("split") == "heldout" if "split" in d else n % 3 == 0
        if split == "all" or (split == "heldout") == held:
            items.append(QAItem(d["question"], (Gold(d["source"], heading=d["heading"]),), id=d["id"]))
    return items


def latencies(items: list[QAItem], store: MilvusStore, embedder, modes: list[str],
              heading_weight: float | None = None, query_adapter: bool = True) -> dict[str, dict[str, float]]:
    """Per-question wall time of Retriever.retrieve (k=5) with the real embedder, per mode."""
    from rag.retriever import Retriever

    retriever = Retriever(store, embedder, heading_weight=heading_weight, query_adapter=query_adapter)
    retriever.retrieve("warm up", 5, mode="hybrid")  # load the model outside the timings
    out = {}
    for mode in modes:
        times = []
        for it in items:
            t0 = time.perf_counter()
            retriever.retrieve(it.question, 5, mode=mode)
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        out[mode] = {"p50": round(times[len(times) // 2], 1), "p90": round(times[int(len(times) * 0.9)], 1)}
    return out


def rrf_grid(items: list[QAItem], store: MilvusStore, embedder, depth: int = 50) -> dict[str, dict[str, float]]:
    from evals.datasets import qa_ranking
    from evals.metrics import QA_METRICS, evaluate

    lists = {}
    for it in items:
        dense = store.search_dense(embedder.embed_query(it.question), depth)
        lexical = store.search_bm25(it.question, depth)
        lists[it.id] = (dense, lexical)
    out = {}
    for k in (5, 10, 20, 60):
        for wb in (1.0, 0.7, 0.5, 0.3, 0.2):
            run, qrels = {}, {}
            for it in items:
                fused, by_id = {}, {}
                for w, hits in ((1.0, lists[it.id][0]), (wb, lists[it.id][1])):
                    for rank, h in enumerate(hits, 1):
                        fused[h.id] = fused.get(h.id, 0.0) + w / (k + rank)
                        by_id[h.id] = h
                top = [by_id[i] for i in sorted(fused, key=lambda i: -fused[i])[:10]]
                run[it.id], qrels[it.id] = qa_ranking(top, it)
            out[f"k={k} w_bm25={wb}"] = evaluate(run, qrels, QA_METRICS)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("which", choices=sorted(SETS))
    p.add_argument("--embedder", default="minilm")
    p.add_argument("--split", choices=["dev", "heldout", "all"], default="dev")
    p.add_argument("--modes", default="dense,bm25,hybrid")
    p.add_argument("--analyzer", default="auto", help="BM25 analyzer of the collection")
    p.add_argument("--weights", help="hybrid: DENSE,BM25 weights (score-normalised sum) instead of RRF")
    p.add_argument("--rrf-k", type=int)
    p.add_argument("--heading-weight", type=float,
                   help="hybrid: the heading route's RRF weight (0: off; default: the embedder's)")
    p.add_argument("--query-adapter", action=argparse.BooleanOptionalAction, default=None,
                   help="hybrid: search with the collection's fitted query adapter (default: RAG_QUERY_ADAPTER, on)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rerank", choices=["off", "llm"], default="off",
                   help="llm: listwise rerank by the LLM of LLM_BASE_URL / DEEPSEEK_API_KEY (RAG_RERANK)")
    p.add_argument("--hyde", action="store_true", help="HyDE query passage by that LLM (RAG_HYDE)")
    p.add_argument("--collapse", action=argparse.BooleanOptionalAction, default=None,
                   help="one hit per section (source + heading path) in every mode")
    p.add_argument("--rrf-grid", action="store_true",
                   help="fetch the dense and BM25 top-50 once per question and score weighted RRF "
                   "w_dense/(k+rank) + w_bm25/(k+rank) over a grid of k and BM25 weights")
    p.add_argument("--latency", action="store_true",
                   help="also time each question end to end (real query embedding + search, k=5, default mode "
                   "settings) and report p50/p90 per mode")
    p.add_argument("--fusions", help="also score hybrid under each fusion on the same index, e.g. "
                   "'rrf:10,rrf:60,w:0.7:0.3' (RRF with k, or normalised weighted sum DENSE:BM25)")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "rag-dev-embed-cache"))
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "rag_dev_results.jsonl"))
    p.add_argument("--show-misses", action="store_true")
    args = p.parse_args(argv)

    items = load_items(args.which, args.split)
    config = RagConfig.load(embedder=args.embedder, rerank=args.rerank, hyde=args.hyde or None)
    if (args.rerank != "off" or args.hyde) and config.llm is None:
        p.error("--rerank llm / --hyde need an LLM: set DEEPSEEK_API_KEY or LLM_BASE_URL (and LLM_MODEL)")
    embedder = CachedEmbedder(make_embedder(config), Path(args.cache))
    weights = tuple(float(x) for x in args.weights.split(",")) if args.weights else None
    opts = {"rrf_k": args.rrf_k or config.rrf_k, "weights": weights, "heading_weight": args.heading_weight,
            "collapse": config.collapse if args.collapse is None else args.collapse,
            "query_adapter": config.query_adapter if args.query_adapter is None else args.query_adapter}
    llm = LLMClient(*config.llm, timeout=config.llm_timeout) if config.llm else None
    stages = llm_stages(config, llm)  # objects: kept out of the JSON record (`opts`)
    tmp = tempfile.mkdtemp(prefix="rag-dev-")
    try:
        uri = str(Path(tmp) / "milvus.db")
        store = MilvusStore(uri, "dev")
        try:
            t0 = time.perf_counter()
            rcfg = RagConfig.load(milvus_uri=uri, collection="dev", embedder=args.embedder)
            report = ingest([str(d) for d in SETS[args.which][1]], rcfg, IngestConfig.load(analyzer=args.analyzer),
                            recreate=True, embedder=embedder, store=store, progress=False, warn=lambda m: None)
            index_s = time.perf_counter() - t0
            store.open_existing(embedder)
            analyzer = (store.describe().get("properties") or {}).get("rag.analyzer")
            results, ranks = eval_qa(items, store, embedder, args.modes.split(","), args.k, {**opts, **stages},
                                     progress=False)
            fusions = []
            grid = rrf_grid(items, store, embedder) if args.rrf_grid else {}
            latency = latencies(items, store, embedder.inner, args.modes.split(","), args.heading_weight,
                                opts["query_adapter"]) if args.latency else {}
            for f in (args.fusions or "").split(","):
                if f:
                    kind, *nums = f.split(":")
                    fopts = {"rrf_k": int(nums[0]), "weights": None} if kind == "rrf" else \
                        {"rrf_k": 10, "weights": tuple(float(x) for x in nums)}
                    res, _ = eval_qa(items, store, embedder, ["hybrid"], args.k, {**fopts, "collapse": opts["collapse"]},
                                     progress=False)
                    fusions.append((f, res[0]))
        finally:
            store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"set": args.which, "split": args.split, "questions": len(items), "embedder": embedder.model_id,
           "analyzer": analyzer, "retriever": {**opts, "rerank": args.rerank, "hyde": args.hyde},
           "rrf_grid": grid, "latency_ms": latency, "fusions": {name: {m: round(v, 3) for m, v in r.metrics.items()} for name, r in fusions}, "chunks": report.chunks_written,
           "index_seconds": round(index_s, 1), "embedded_now": embedder.computed,
           "results": [{"mode": r.mode, "used": r.used, **{m: round(v, 3) for m, v in r.metrics.items()},
                        "ms_per_query": round(r.ms_per_query, 1)} for r in results],
           "ranks": ranks}
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps({**out, "argv": sys.argv[1:] if argv is None else argv}, ensure_ascii=False) + "\n")
    print(f"{args.which}/{args.split}: {len(items)} questions, {embedder.model_id}, analyzer {analyzer}, "
          f"{report.chunks_written} chunks (indexed in {index_s:.0f} s, {embedder.computed} texts embedded now)")
    for r in out["results"]:
        print(f"  {r['mode']:>6}: " + "  ".join(f"{m} {r[m]:.3f}" for m in ("hit@1", "hit@3", "hit@5", "hit@10", "mrr@10"))
              + f"  {r['ms_per_query']:.0f} ms/q")
    for mode, ms in latency.items():
        print(f"  latency {mode:>6} (embed + search, k=5): p50 {ms['p50']:.0f} ms, p90 {ms['p90']:.0f} ms")
    for name, m in grid.items():
        print(f"  weighted RRF {name:>14}: " + "  ".join(f"{k} {m[k]:.3f}" for k in ("hit@1", "hit@3", "hit@5", "hit@10", "mrr@10")))
    for name, r in fusions:
        print(f"  hybrid {name:>10}: " + "  ".join(f"{m} {r.metrics[m]:.3f}" for m in ("hit@1", "hit@3", "hit@5", "hit@10", "mrr@10")))
    if args.show_misses:
        for mode, rk in ranks.items():
            missed = [it.question for it in items if (rk[it.id] or 99) > 5]
            print(f"missed by {mode} in the top 5: {len(missed)}")
            for q in missed:
                print("   -", q)
    return 0


if __name__ == "__main__":
    sys.exit(main())
