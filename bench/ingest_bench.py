"""Ingest benchmark: cold ingest vs the raw embedder, unchanged re-ingest, retrieval latency.

    .venv/bin/python bench/ingest_bench.py --out build/ingest_bench.json

In one process, with the model loaded and warm before any timing:
1. cold ingest into a fresh Milvus Lite db: files/s, chunks/s, share of time spent embedding;
2. the raw embedder on exactly the texts the ingest embeds (same chunker, same batches), timed
   *paired*: each batch is embedded once more, untouched, right beside the ingest's own call.
   On a shared machine the load drifts by tens of percent within minutes, so separate raw runs
   before or after the ingest compare different machines; paired batches see the same load.
   The paired calls' time is subtracted from the ingest's wall time;
3. the same ingest again, unchanged: seconds and chunks embedded (must be 0);
4. retrieval latency (query embedding + Milvus search) over questions made from the corpus'
   headings, plus how often the heading's own section comes back in the top 5.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "milvus_docs_en"
TARGETS = {"ingest_vs_raw": 0.85, "reingest_speedup": 20.0, "retrieval_p50_ms": 30.0}


def machine() -> dict:
    """What the numbers were measured on: they mean little without it."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "nproc": os.cpu_count(), "cpu": cpu, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "loadavg_start": os.getloadavg()[0],
    }


class PairedEmbedder:
    """Wraps the real embedder; every batch is also embedded once more, timed on its own.

    The extra call alternates before/after the ingest's call so cache effects cancel out.
    """

    def __init__(self, inner):
        self.inner = inner
        self.model_id, self.dim, self.max_tokens = inner.model_id, inner.dim, inner.max_tokens
        self.score_floor = inner.score_floor
        self.count_tokens = inner.count_tokens
        self.embed_query = inner.embed_query
        self.raw_s = self.raw_cpu_s = 0.0
        self.calls = 0

    def _raw(self, texts) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.inner.embed_documents(texts)
        self.raw_s += time.perf_counter() - t
        self.raw_cpu_s += time.process_time() - c

    def embed_documents(self, texts):
        self.calls += 1
        if self.calls % 2:
            self._raw(texts)
            return self.inner.embed_documents(texts)
        out = self.inner.embed_documents(texts)
        self._raw(texts)
        return out


def questions_from_headings(chunks, n: int) -> list[tuple[str, str, str]]:
    """(question, source, header path) from distinct last-level headings, spread over the corpus."""
    seen: dict[str, tuple[str, str, str]] = {}
    for c in chunks:
        if c.header_path and len(c.header_path[-1]) > 12:
            seen.setdefault(c.header_path[-1], (c.header_path[-1], c.source, c.heading))
    pool = sorted(seen.values(), key=lambda q: (q[1], q[2]))
    step = max(len(pool) / n, 1.0)
    return [pool[int(i * step)] for i in range(min(n, len(pool)))]


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def run(args: argparse.Namespace) -> dict:
    from ingest.chunker import Chunker
    from ingest.config import IngestConfig
    from ingest.loader import Document, discover, load
    from ingest.pipeline import ingest
    from rag.config import RagConfig
    from rag.embedder import MiniLMEmbedder
    from rag.retriever import Retriever
    from rag.store import MilvusStore

    info = machine()
    corpus = Path(args.corpus).resolve()
    config = IngestConfig.load(environ={}, embed_batch=args.batch)
    embedder = MiniLMEmbedder(device="cpu")
    embedder.embed_documents(["warm-up: load the model and touch every layer once"] * 8)

    # The exact texts the ingest will embed: same loader, chunker and settings as ingest().
    t0 = time.perf_counter()
    docs = [d for d in (load(f, int(config.max_file_mb * 1e6)) for f in discover([str(corpus)], config.glob_list).files)
            if isinstance(d, Document)]
    chunker = Chunker(embedder.count_tokens, embedder.max_tokens, config.chunk_size, config.chunk_overlap)
    chunks = [c for d in docs for c in chunker.chunk(d)]
    chunk_s = time.perf_counter() - t0
    texts = [chunker.embed_text(c) for c in chunks]
    print(f"corpus {corpus}: {len(docs)} files, {len(chunks)} chunks (read+chunk {chunk_s:.1f} s)", file=sys.stderr)

    embedder.embed_documents(texts[: config.embed_batch])  # one full-size batch: allocator and caches warm

    with tempfile.TemporaryDirectory(prefix="ingest_bench_") as tmp:
        rag_config = RagConfig.load(environ={}, milvus_uri=str(Path(tmp) / "bench.db"), collection="bench")
        paired = PairedEmbedder(embedder)
        cpu0 = time.process_time()
        cold = ingest([str(corpus)], rag_config, config, embedder=paired, progress=False, warn=lambda m: None)
        cold_cpu = time.process_time() - cpu0 - paired.raw_cpu_s
        cold_s = cold.seconds - paired.raw_s  # the ingest without the paired raw calls
        cold_embed_s = cold.embed_seconds - paired.raw_s
        print(f"cold ingest: {cold.summary()} (incl. {paired.raw_s:.1f} s of paired raw embedding)", file=sys.stderr)
        if cold.chunks_written != len(texts):
            print(f"warning: ingest wrote {cold.chunks_written} chunks, the chunker made {len(texts)}", file=sys.stderr)
        again = ingest([str(corpus)], rag_config, config, embedder=embedder, progress=False, warn=lambda m: None)
        print(f"re-ingest: {again.summary()}", file=sys.stderr)

        store = MilvusStore(rag_config.milvus_uri, rag_config.collection)
        store.open_existing(embedder)
        retriever = Retriever(store, embedder)
        qs = questions_from_headings(chunks, args.questions)
        for q, _, _ in qs[:3]:
            retriever.retrieve(q, 5)  # warm the search path
        lat, emb, srch, self_hits = [], [], [], 0
        for q, source, heading in qs:
            t = time.perf_counter()
            r = retriever.retrieve(q, 5)
            lat.append((time.perf_counter() - t) * 1e3)
            emb.append(r.embed_ms)
            srch.append(r.search_ms)
            self_hits += any(h.source == source and h.header_path == heading for h in r.hits)
        store.close()

    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {**info, "loadavg_end": os.getloadavg()[0]},
        "corpus": str(corpus), "files": len(docs), "chunks": len(chunks), "batch": config.embed_batch,
        "chunk_size": config.chunk_size,
        "read_chunk_s": chunk_s,
        "cold": {
            "seconds": cold_s, "files_per_s": cold.files_new / cold_s, "chunks_per_s": cold.chunks_written / cold_s,
            "embed_seconds": cold_embed_s, "embed_share": cold_embed_s / cold_s, "cpu_seconds": cold_cpu,
            "chunks_written": cold.chunks_written,
        },
        "raw_embed": {"seconds": paired.raw_s, "cpu_seconds": paired.raw_cpu_s,
                      "chunks_per_s": len(texts) / paired.raw_s},
        "ingest_vs_raw": paired.raw_s / cold_s,
        "ingest_vs_raw_cpu": paired.raw_cpu_s / cold_cpu,
        "reingest": {"seconds": again.seconds, "chunks_embedded": again.chunks_embedded,
                     "speedup": cold_s / again.seconds},
        "retrieval": {"questions": len(qs), "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95),
                      "embed_p50_ms": percentile(emb, 50), "search_p50_ms": percentile(srch, 50),
                      "self_hit_at_5": self_hits / len(qs)},
    }
    result["targets"] = {
        "ingest_vs_raw": result["ingest_vs_raw"] >= TARGETS["ingest_vs_raw"],
        "reingest_speedup": result["reingest"]["speedup"] >= TARGETS["reingest_speedup"]
        and again.chunks_embedded == 0,
        "retrieval_p50_ms": result["retrieval"]["p50_ms"] <= TARGETS["retrieval_p50_ms"],
    }
    return result


def table(r: dict) -> str:
    ok = {True: "ok", False: "MISSED"}
    c, raw, re_, q = r["cold"], r["raw_embed"], r["reingest"], r["retrieval"]
    rows = [
        ("corpus", f"{r['files']} files, {r['chunks']} chunks (batch {r['batch']}, chunk size {r['chunk_size']})"),
        ("cold ingest", f"{c['seconds']:.1f} s = {c['files_per_s']:.2f} files/s, {c['chunks_per_s']:.1f} chunks/s"),
        ("  of which embedding", f"{c['embed_seconds']:.1f} s ({c['embed_share']:.0%})"),
        ("raw embedder (paired)", f"{raw['chunks_per_s']:.1f} chunks/s ({raw['seconds']:.1f} s)"),
        ("ingest / raw", f"{r['ingest_vs_raw']:.0%} (target >= 85%: {ok[r['targets']['ingest_vs_raw']]}); "
                         f"by CPU time {r['ingest_vs_raw_cpu']:.0%}"),
        ("re-ingest unchanged", f"{re_['seconds']:.2f} s, {re_['chunks_embedded']} chunks embedded, "
                                f"{re_['speedup']:.0f}x faster (target >= 20x: {ok[r['targets']['reingest_speedup']]})"),
        ("retrieval (k=5)", f"p50 {q['p50_ms']:.1f} ms, p95 {q['p95_ms']:.1f} ms over {q['questions']} questions "
                            f"(target p50 <= 30 ms: {ok[r['targets']['retrieval_p50_ms']]})"),
        ("  embed / search p50", f"{q['embed_p50_ms']:.1f} ms / {q['search_p50_ms']:.1f} ms"),
        ("  own section in top 5", f"{q['self_hit_at_5']:.0%}"),
        ("machine", f"{r['machine']['nproc']} cores, {r['machine']['cpu']}, load avg "
                    f"{r['machine']['loadavg_start']:.1f} -> {r['machine']['loadavg_end']:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="markdown folder (default: shared milvus_docs_en)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--batch", type=int, default=256, help="chunks per embedding call and upsert (RAG_EMBED_BATCH)")
    p.add_argument("--questions", type=int, default=100, help="retrieval questions built from headings")
    args = p.parse_args(argv)
    if not Path(args.corpus).is_dir():
        p.error(f"corpus {args.corpus} is not a folder; pass --corpus")
    result = run(args)
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
