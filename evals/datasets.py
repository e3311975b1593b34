"""Evaluation data: BEIR folders (corpus, queries, qrels) and QA files (questions with gold passages)."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rag.types import Hit

# -- BEIR ------------------------------------------------------------------------------------


@dataclasses.dataclass
class BeirData:
    """One BEIR split: corpus (id -> {"title", "text"}), queries (id -> text) and qrels."""

    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    name: str = ""
    split: str = "test"

    def describe(self) -> str:
        return f"{self.name}/{self.split}: {len(self.corpus)} docs, {len(self.qrels)} queries"


def load_beir(folder: str | Path, split: str = "test") -> BeirData:
    """Read corpus.jsonl, queries.jsonl and qrels/<split>.tsv; keeps only judged queries."""
    folder = Path(folder)
    for need in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (folder / need).exists():
            raise FileNotFoundError(f"{folder / need} is missing; expected a BEIR folder with {need}")
    corpus: dict[str, dict[str, str]] = {}
    with open(folder / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                corpus[str(d["_id"])] = {"title": d.get("title") or "", "text": d.get("text") or ""}
    qrels: dict[str, dict[str, int]] = {}
    with open(folder / "qrels" / f"{split}.tsv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(row["score"])
    queries: dict[str, str] = {}
    with open(folder / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                if str(d["_id"]) in qrels:
                    queries[str(d["_id"])] = d["text"]
    qrels = {q: r for q, r in qrels.items() if q in queries}
    return BeirData(corpus, queries, qrels, folder.name, split)


def subset(data: BeirData, limit_queries: int | None = None, limit_docs: int | None = None) -> BeirData:
    """A fixed, reproducible subset: no randomness, so two runs and two machines agree.

    Queries: the first `limit_queries` judged queries in qrels-file order. Documents: every
    judged document of those queries (so each query stays answerable), then other documents
    in corpus-file order until `limit_docs` are taken. With `limit_docs` alone, the first
    queries whose judged documents all fit are kept.
    """
    qids = list(data.qrels)[:limit_queries] if limit_queries else list(data.qrels)
    if limit_docs is None:
        docs = data.corpus
    else:
        must: list[str] = []
        kept_q = []
        for q in qids:
            new = [d for d in data.qrels[q] if d in data.corpus and d not in must]
            if len(must) + len(new) > limit_docs:
                continue  # only reachable without limit_queries, or with too small a limit_docs
            must.extend(new)
            kept_q.append(q)
        qids = kept_q
        chosen = dict.fromkeys(must)
        for d in data.corpus:
            if len(chosen) >= limit_docs:
                break
            chosen.setdefault(d)
        docs = {d: data.corpus[d] for d in chosen}
    qrels = {q: {d: r for d, r in data.qrels[q].items() if d in docs} for q in qids}
    return BeirData(docs, {q: data.queries[q] for q in qids}, qrels, data.name, data.split)


# -- QA files --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QAItem:
    """One question with its gold passage: a source file, and optionally a heading or a span."""

    question: str
    source: str  # path of the gold file, matched as a path suffix of the hit's source
    heading: str | None = None  # the gold section's heading (last element of the header path)
    span: tuple[int, int] | None = None  # character offsets of the gold text in that file
    id: str = ""


def load_qa(path: str | Path) -> list[QAItem]:
    """JSONL: {"question", "source", optional "heading", optional "span": [start, end], "id"}."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            d: dict[str, Any] = json.loads(line)
            if "question" not in d or "source" not in d:
                raise ValueError(f"{path}:{n}: each line needs 'question' and 'source'")
            span = tuple(d["span"]) if d.get("span") else None
            items.append(QAItem(d["question"], d["source"], d.get("heading"), span, str(d.get("id", n))))
    return items


def _same_file(hit_source: str, gold: str) -> bool:
    """Gold paths are relative to the ingested folder; hit sources may carry a longer prefix."""
    hit_source, gold = hit_source.replace("\\", "/"), gold.replace("\\", "/").lstrip("./")
    return hit_source == gold or hit_source.endswith("/" + gold)


def is_gold(hit: Hit, item: QAItem) -> bool:
    """A hit answers `item` when it is from the gold file and overlaps the gold span or section."""
    if not _same_file(hit.source, item.source):
        return False
    if item.span is not None:
        start, end = hit.metadata.get("start"), hit.metadata.get("end")
        return start is not None and end is not None and start < item.span[1] and item.span[0] < end
    if item.heading:
        last = hit.header_path.split(" › ")[-1].strip() if hit.header_path else ""
        return last == item.heading.strip()
    return True


def qa_ranking(hits: Sequence[Hit], item: QAItem) -> tuple[list[str], dict[str, int]]:
    """Turn a QA item's hits into (ranking, qrels) so `evaluate` scores it like BEIR."""
    ranked = [f"{i}:{'gold' if is_gold(h, item) else 'miss'}" for i, h in enumerate(hits)]
    return ranked, {r: 1 for r in ranked if r.endswith(":gold")} or {"none": 1}
