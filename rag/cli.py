"""`rag-ask "question"`: stream a cited answer from the indexed docs."""

from __future__ import annotations

import argparse
import json
import sys
import time

from rag.config import RagConfig
from rag.llm import Delta, LLMError
from rag.pipeline import Finished, RagPipeline, Retrieved
from rag.settings import SettingsError
from rag.store import StoreError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rag-ask", description="Answer a question from the indexed docs, with citations.")
    p.add_argument("question")
    p.add_argument("--k", type=int, help="passages to retrieve (RAG_TOP_K)")
    p.add_argument("--collection", help="Milvus collection (RAG_COLLECTION)")
    p.add_argument("--uri", help="Milvus Lite path or server URI (MILVUS_URI)")
    p.add_argument("--embedder", help="auto (default: the collection's own), minilm, e5 or openai:<model> (RAG_EMBEDDER)")
    p.add_argument("--mode", choices=["dense", "bm25", "hybrid"], help="retrieval mode (RAG_MODE)")
    p.add_argument("--filter", default="", help='Milvus filter expression, e.g. \'source like "docs/%%"\'')
    p.add_argument("--score-floor", type=float, help="minimum dense similarity (RAG_SCORE_FLOOR)")
    p.add_argument("--rerank", choices=["off", "llm"], help="listwise rerank by the configured LLM (RAG_RERANK)")
    p.add_argument("--hyde", action=argparse.BooleanOptionalAction, default=None,
                   help="search with an LLM-written answer passage too (RAG_HYDE)")
    p.add_argument("--retrieval-only", action="store_true", help="do not call the LLM even if one is configured")
    p.add_argument("--json", action="store_true", help="print one JSON object: answer, sources, timings")
    return p


def hit_json(n: int, hit) -> dict:
    return {
        "n": n, "source": hit.source, "heading": hit.header_path, "score": round(hit.score, 4),
        "similarity": None if hit.similarity is None else round(hit.similarity, 4),
        "rank": hit.rank, "mode": hit.mode,
        "chunk_id": hit.id, "text": hit.text,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = RagConfig.load(
            top_k=args.k, collection=args.collection, milvus_uri=args.uri, embedder=args.embedder,
            mode=args.mode, score_floor=args.score_floor, rerank="off" if args.retrieval_only else args.rerank,
            hyde=False if args.retrieval_only else args.hyde,
        )
        pipeline = RagPipeline(config)
    except (SettingsError, StoreError) as e:
        print(f"rag-ask: {e}", file=sys.stderr)
        return 2
    out = sys.stdout
    load_ms = 0.0
    if pipeline.needs_query_vectors and not pipeline.embedder.loaded:
        # Seconds of torch start-up on the first question: say so rather than sit silent.
        print("rag-ask: loading the embedding model ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        pipeline.embedder.load()
        load_ms = (time.perf_counter() - t0) * 1e3
    try:
        done: Finished | None = None
        in_reasoning = False
        for ev in pipeline.ask(args.question, filter=args.filter, use_llm=not args.retrieval_only,
                               load_model_ms=load_ms):
            if isinstance(ev, Finished):
                done = ev
            elif isinstance(ev, Delta) and not args.json:
                if ev.kind == "reasoning" and not in_reasoning:
                    out.write("(thinking) ")
                    in_reasoning = True
                elif ev.kind == "answer" and in_reasoning:
                    out.write("\n\n")
                    in_reasoning = False
                out.write(ev.text)
                out.flush()
            elif isinstance(ev, Retrieved):
                pass
    except (LLMError, StoreError) as e:
        print(f"\nrag-ask: {e}", file=sys.stderr)
        return 1
    finally:
        pipeline.close()
    assert done is not None
    if args.json:
        json.dump({
            "question": args.question, "status": done.status, "answer": done.answer, "reasoning": done.reasoning,
            "sources": [hit_json(i, h) for i, h in enumerate(done.hits, 1)],
            "timings": {k: round(v, 2) for k, v in done.timings.items()},
            "usage": vars(done.usage) if done.usage else None,
        }, out, ensure_ascii=False, indent=2)
        out.write("\n")
        return 0
    out.write("\n\nSources:\n" if done.hits else "\n")
    for i, h in enumerate(done.hits, 1):
        out.write(f"  {h.citation(i)}\n")
        if done.status == "retrieval-only":
            snippet = " ".join(h.text.split())
            out.write(f"      {snippet[:300]}{'…' if len(snippet) > 300 else ''}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
