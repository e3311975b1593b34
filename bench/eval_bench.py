"""Retrieval-quality benchmark (issue 8): SciFact (BEIR) and two docs-QA checks, via rag-eval.

    python bench/eval_bench.py scifact --embedder minilm          # test split, ~9 min on 2 quiet cores
    python bench/eval_bench.py scifact --embedder e5              # 40-80 min: run it with nohup
    python bench/eval_bench.py zh --embedder e5                   # bench/zh_questions.jsonl
    python bench/eval_bench.py en --embedder minilm               # English Milvus FAQ headings
    python bench/eval_bench.py floors --embedder e5 --uri DB --collection rag_eval_qa --on-topic zh

Each run prints rag-eval's results and appends one JSON line (results, timings, machine) to --out.
`--extra "--uri DB --keep"` (scifact) or `--extra "--uri DB"` (zh, en) keeps the collection for a
later `floors` run.

The Chinese check (zh) indexes the Milvus v2.0 zh-CN docs plus the TiDB zh FAQ pages from
shared/data/zh_docs; its 49 questions are paraphrases written from FAQ entries. The English
check (en) indexes the English Milvus docs; its questions are the FAQ headings themselves.
In both, the gold of a question is its FAQ entry, and the heading of every gold entry is
removed from the indexed copy (otherwise the heading, a near-copy of the question, makes the
check trivial); the gold is then the character span of the entry's answer in that copy, and a
retrieved chunk counts when it overlaps that span.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evals.cli import main as rag_eval  # noqa: E402

SHARED = Path(os.environ.get("RAG_SHARED_DATA", REPO.parent / "shared" / "data"))
ZH_DIRS = ["milvus_docs_v2.0.x_zh-CN", "pingcap_docs-cn_subset/faq"]
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t]*$")
FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})")


def strip_gold_headings(text: str, headings: set[str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """Remove the lines of `headings` from a markdown text.

    Returns the new text and, per removed heading, the span of its section in the new text:
    from where the heading was to the next remaining or removed heading (fences respected).
    """
    out: list[str] = []
    pos = 0
    spans: dict[str, tuple[int, int]] = {}
    open_heading: str | None = None
    fence = False
    for line in text.splitlines(keepends=True):
        if FENCE.match(line):
            fence = not fence
        m = None if fence else HEADING.match(line.rstrip("\r\n"))
        if m and open_heading is not None:
            spans[open_heading] = (spans[open_heading][0], pos)
            open_heading = None
        if m and m.group(1).strip() in headings:
            open_heading = m.group(1).strip()
            spans[open_heading] = (pos, pos)
            continue
        out.append(line)
        pos += len(line)
    if open_heading is not None:
        spans[open_heading] = (spans[open_heading][0], pos)
    return "".join(out), spans


def zh_items() -> list[dict]:
    path = REPO / "bench" / "zh_questions.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def en_items() -> list[dict]:
    """English check: each Milvus FAQ heading is a question; its entry is the gold."""
    items = []
    for f in sorted((SHARED / "milvus_docs_en" / "faq").glob("*.md")):
        for m in re.finditer(r"^####[ \t]+(.+?)[ \t]*$", f.read_text(encoding="utf-8"), re.M):
            if m.group(1) != "Still have questions?":
                items.append({"id": f"en{len(items) + 1:02d}", "question": m.group(1),
                              "source": f"faq/{f.name}", "heading": m.group(1)})
    return items


CHECKS = {  # name: (questions, corpus root, folders indexed)
    "zh": (zh_items, SHARED / "zh_docs", ZH_DIRS),
    "en": (en_items, SHARED / "milvus_docs_en", ["."]),
}


def build_qa_corpus(which: str, dest: Path) -> tuple[Path, list[str]]:
    """Copy a check's corpus into `dest` minus the gold headings; return the QA file and folders."""
    make_items, root, dirs = CHECKS[which]
    items = make_items()
    by_file: dict[str, set[str]] = {}
    for it in items:
        by_file.setdefault(it["source"], set()).add(it["heading"])
    for d in dirs:
        shutil.copytree(root / d, dest / d, dirs_exist_ok=True)
    spans: dict[tuple[str, str], tuple[int, int]] = {}
    for src, heads in by_file.items():
        new, found = strip_gold_headings((root / src).read_text(encoding="utf-8"), heads)
        if heads - set(found):
            raise SystemExit(f"{src}: headings not found: {sorted(heads - set(found))}")
        (dest / src).write_text(new, encoding="utf-8")
        spans.update({(src, h): sp for h, sp in found.items()})
    qa = dest.parent / f"{which}_questions.spans.jsonl"
    with open(qa, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({**it, "span": spans[(it["source"], it["heading"])]}, ensure_ascii=False) + "\n")
    return qa, dirs


def run(argv: list[str]) -> dict:
    """rag-eval in-process: the table goes to stderr for people, the JSON is returned."""
    t0 = time.perf_counter()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = rag_eval([*argv, "--json"])
    if rc != 0:
        raise SystemExit(f"rag-eval {' '.join(argv)} failed ({rc})")
    out = json.loads(buf.getvalue())
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def machine() -> dict:
    """Where and when; CPU seconds beside wall time show how much a busy machine slowed the run."""
    import resource

    use = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_at_end": os.getloadavg(), "cpu_seconds": use.ru_utime + use.ru_stime,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {f"p{q}": round(xs[min(len(xs) - 1, int(len(xs) * q / 100))], 3) for q in (5, 10, 25, 50, 75, 90, 95)} if xs else {}


def _share(flags: list[bool]) -> float:
    """Share of true flags (0 for none), rounded for the report."""
    return round(sum(flags) / max(len(flags), 1), 3)


def floors(uri: str, collection: str, embedder_name: str, on_topic: str, floor: float | None,
           sweep: list[float] | None = None) -> dict:
    """Check an embedder's score floor on a kept collection (rag-eval ... --uri U --keep).

    On-topic: questions whose gold is known (SciFact qrels, or the zh / en QA spans); we look at
    the dense similarity of the best gold chunk in the top 10. Off-topic: questions the corpus
    cannot answer (Milvus FAQ questions against SciFact; SciFact claims against the docs); we
    look at the similarity of their top hit. A good floor keeps nearly all gold hits and drops
    most off-topic top hits. `sweep` lists the floors tabulated (default: the floor +-0.15 in
    steps of 0.05, too coarse for e5, whose scores all lie within a few hundredths).
    """
    from evals.datasets import is_gold, load_beir, load_qa
    from rag.config import RagConfig
    from rag.embedder import make_embedder
    from rag.store import MilvusStore

    emb = make_embedder(RagConfig.load(embedder=embedder_name))
    floor = emb.score_floor if floor is None else floor
    store = MilvusStore(uri, collection)
    store.open_existing(emb)
    gold_sims: list[float] = []
    on_top: list[float] = []  # top hit of every on-topic question, gold found or not
    # Hybrid (the default mode) also finds gold chunks by BM25 alone, whose dense similarity
    # may be low: the floor drops those too.
    hybrid_gold: list[float] = []
    rrf_k = RagConfig.load().rrf_k
    try:
        if on_topic == "scifact":
            data = load_beir(SHARED / "scifact", "test")
            for q, text in data.queries.items():
                vec = emb.embed_query(text)
                hits = store.search_dense(vec, 10)
                on_top.append(hits[0].score)
                sims = [h.score for h in hits if data.qrels[q].get(h.source, 0) > 0]
                if sims:
                    gold_sims.append(max(sims))
                if store.bm25:
                    sims = [h.similarity for h in store.search_hybrid(vec, text, 10, rrf_k=rrf_k)
                            if data.qrels[q].get(h.source, 0) > 0]
                    if sims:
                        hybrid_gold.append(max(sims))
            off = [m.group(1) for f in sorted((SHARED / "milvus_docs_en" / "faq").glob("*.md"))
                   for m in re.finditer(r"^#### (.+)$", f.read_text(encoding="utf-8"), re.M)]
        else:
            with tempfile.TemporaryDirectory() as tmp:
                items = load_qa(build_qa_corpus(on_topic, Path(tmp) / "corpus")[0])
            for it in items:
                vec = emb.embed_query(it.question)
                hits = store.search_dense(vec, 10)
                on_top.append(hits[0].score)
                sims = [h.score for h in hits if is_gold(h, it)]
                if sims:
                    gold_sims.append(max(sims))
                if store.bm25:
                    sims = [h.similarity for h in store.search_hybrid(vec, it.question, 10, rrf_k=rrf_k) if is_gold(h, it)]
                    if sims:
                        hybrid_gold.append(max(sims))
            # SciFact claims are off-topic for docs about databases, in any language.
            off = list(load_beir(SHARED / "scifact", "test").queries.values())[:100]
        off_top = [store.search_dense(emb.embed_query(q), 1)[0].score for q in off]
    finally:
        store.close()
    floors_ = sweep or [floor + d / 100 for d in range(-15, 20, 5)]
    return {
        "embedder": emb.model_id, "floor": floor, "on_topic": on_topic,
        "gold_found_in_top10": len(gold_sims), "gold_similarity": _percentiles(gold_sims),
        "gold_kept_share": _share([s >= floor for s in gold_sims]),
        "off_topic_questions": len(off), "off_topic_top1_similarity": _percentiles(off_top),
        "off_topic_dropped_share": _share([s < floor for s in off_top]),
        "sweep (floor: gold kept, off-topic dropped)": {
            f"{f:.2f}": (_share([s >= f for s in gold_sims]),
                         _share([s < f for s in off_top]))
            for f in floors_
        },
        # A question whose best dense hit is under the floor has every hit under it: dense and
        # hybrid mode answer it "no-context". For on-topic questions that is the cost of a floor.
        "sweep (floor: on-topic questions with their top hit under it)": {
            f"{f:.2f}": _share([s < f for s in on_top]) for f in floors_
        },
        "gold_min": round(min(gold_sims), 3) if gold_sims else None,
        "hybrid_gold_found_in_top10": len(hybrid_gold), "hybrid_gold_similarity": _percentiles(hybrid_gold),
        "hybrid_gold_min": round(min(hybrid_gold), 3) if hybrid_gold else None,
        "sweep (floor: hybrid gold hits kept)": {
            f"{f:.2f}": _share([s >= f for s in hybrid_gold]) for f in floors_
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("which", choices=["scifact", "zh", "en", "floors"])
    p.add_argument("--uri", help="floors: the kept Milvus Lite db to read")
    p.add_argument("--collection", default="rag_eval", help="floors: collection name (rag_eval or rag_eval_qa)")
    p.add_argument("--on-topic", choices=["scifact", "zh", "en"], default="scifact", help="floors: which gold questions")
    p.add_argument("--floor", type=float, help="floors: floor to check (default: the embedder's)")
    p.add_argument("--sweep", type=lambda s: [float(x) for x in s.split(",")],
                   help="floors: comma list of floors to tabulate, e.g. 0.80,0.82,0.84 (default: floor +-0.15)")
    p.add_argument("--embedder", default="minilm")
    p.add_argument("--modes", default="dense,bm25,hybrid")
    p.add_argument("--split", default="test", help="scifact qrels split (tune on train, report test)")
    p.add_argument("--faq-only", action="store_true",
                   help="zh/en: index only the FAQ folders (a small haystack, for a quick or loaded machine)")
    p.add_argument("--extra", default="", help="more rag-eval options, e.g. '--rrf-k 20 --limit-queries 50'")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "rag_eval_results.jsonl"),
                   help="JSON lines appended here")
    args = p.parse_args()
    extra = args.extra.split()
    for i, word in enumerate(extra[:-1]):  # the QA checks chdir into their corpus copy
        if word == "--uri" and "://" not in extra[i + 1]:
            extra[i + 1] = str(Path(extra[i + 1]).resolve())
    common = ["--embedder", args.embedder, "--modes", args.modes, "--quiet", *extra]
    if args.which == "floors":
        out = floors(args.uri, args.collection, args.embedder, args.on_topic, args.floor, args.sweep)
        out["bench"] = {"which": "floors", "argv": sys.argv[1:], "machine": machine()}
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    if args.which == "scifact":
        out = run(["beir", str(SHARED / "scifact"), "--split", args.split, *common])
    else:
        with tempfile.TemporaryDirectory(prefix=f"{args.which}-eval-") as tmp:
            corpus = Path(tmp) / "corpus"
            qa, dirs = build_qa_corpus(args.which, corpus)
            if args.faq_only:
                lines = qa.read_text(encoding="utf-8").splitlines()
                dirs = sorted({str(Path(json.loads(line)["source"]).parent) for line in lines})
            cwd = os.getcwd()
            os.chdir(corpus)  # sources are then stored relative to the corpus root
            try:
                out = run(["qa", str(qa), "--docs", *dirs, *common])
            finally:
                os.chdir(cwd)
    out["bench"] = {"which": args.which, "argv": sys.argv[1:], "machine": machine()}
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(out, ensure_ascii=False) + "\n")
    metrics = out["metrics"]
    print(f"{args.which} {args.embedder}: {out.get('docs', out.get('questions'))} docs/questions, "
          f"wall {out['wall_seconds']:.0f} s, index {json.dumps(out['index'])}")
    for r in out["results"]:
        print(f"  {r['mode']:>6} (ran {r['used']}): " + "  ".join(f"{m} {r['metrics'][m]:.3f}" for m in metrics)
              + f"  {r['ms_per_query']:.0f} ms/q")
    return 0


if __name__ == "__main__":
    sys.exit(main())
