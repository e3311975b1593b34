"""`rag-ingest PATH...`: bring a Milvus collection in line with markdown folders, files or globs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from tqdm.auto import tqdm

from ingest.config import IngestConfig
from ingest.pipeline import ingest
from rag.bm25 import ANALYZERS
from rag.config import RagConfig
from rag.settings import SettingsError
from rag.store import StoreError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rag-ingest",
        description="Chunk, embed and index markdown/text into Milvus. Incremental: unchanged files cost nothing.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="folders, files or quoted glob patterns")
    p.add_argument("--collection", help="Milvus collection (RAG_COLLECTION, default docs)")
    p.add_argument("--uri", help="Milvus Lite path or server URI (MILVUS_URI, default ./data/milvus.db)")
    p.add_argument("--embedder", help="auto (default): the collection's own, else e5 for a mostly-CJK corpus, "
                   "else minilm; or minilm, e5 (multilingual), openai:<model> (RAG_EMBEDDER)")
    p.add_argument("--glob", action="append", help="pattern inside folders; repeatable (default md, markdown, txt)")
    p.add_argument("--chunk-size", type=int, help="tokens per chunk, header path included (RAG_CHUNK_SIZE)")
    p.add_argument("--chunk-overlap", type=int, help="overlap tokens (RAG_CHUNK_OVERLAP)")
    p.add_argument("--max-file-mb", type=float, help="skip larger files (RAG_MAX_FILE_MB)")
    p.add_argument("--analyzer", choices=["auto", *ANALYZERS], help="BM25 analyzer of a new collection (RAG_ANALYZER)")
    p.add_argument("--recreate", action="store_true", help="drop the collection and rebuild it")
    p.add_argument("--no-prune", action="store_true", help="keep chunks of files gone from the folders")
    p.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="rag-ingest: %(message)s")
    try:
        rag_config = RagConfig.load(collection=args.collection, milvus_uri=args.uri, embedder=args.embedder)
        config = IngestConfig.load(
            chunk_size=args.chunk_size, chunk_overlap=args.chunk_overlap, max_file_mb=args.max_file_mb,
            globs=",".join(args.glob) if args.glob else None, analyzer=args.analyzer,
            prune=False if args.no_prune else None,
        )
        # Skips and front-matter problems go to stderr as they happen, one line each, beside the
        # progress bars: stdout carries only the result, so `--json` output stays parseable.
        report = ingest(args.paths, rag_config, config, recreate=args.recreate, dry_run=args.dry_run,
                        progress=not args.quiet, warn=lambda msg: tqdm.write(msg, file=sys.stderr))
    except (SettingsError, StoreError, FileNotFoundError) as e:
        print(f"rag-ingest: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = dataclasses.asdict(report)
        out["chunks_per_second"] = report.chunks_per_second
        print(json.dumps(out, indent=2))
    else:
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
