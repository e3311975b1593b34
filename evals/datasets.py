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

MATCHES = ("any", "exact")


@dataclasses.dataclass(frozen=True)
class Gold:
    """One gold passage: a source file, and optionally its section heading or its character span."""

    source: str  # path of the gold file, matched as a path suffix of the hit's source
    heading: str | None = None  # the gold section's heading (last element of the header path)
    span: tuple[int, int] | None = None  # character offsets of the gold text in that file


@dataclasses.dataclass(frozen=True)
class QAItem:
    """One question and its gold passages (any of them answers it)."""

    question: str
    gold: tuple[Gold, ...]
    id: str = ""


def _gold(d: dict[str, Any], where: str) -> Gold:
    if not isinstance(d, dict) or not d.get("source"):
        raise ValueError(f"{where}: each gold passage needs a 'source' (and optionally 'heading' or 'span')")
    span = d.get("span")
    if span is not None and not (isinstance(span, list | tuple) and len(span) == 2 and span[0] < span[1]):
        raise ValueError(f"{where}: 'span' must be [start, end] character offsets with start < end (got {span!r})")
    return Gold(d["source"], d.get("heading"), tuple(span) if span else None)


def load_qa(path: str | Path) -> list[QAItem]:
    """A QA file: JSON lines, or one JSON list, of questions with their gold passages.

    Each question is {"question", "id"?, and either "source" with "heading"? / "span"?, or
    "gold": [{"source", "heading"?, "span"?}, ...] for a question several passages answer}.
    """
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); fix the list or write one question per line") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); one JSON object per line") from None
    items = []
    for n, d in records:
        where = f"{path}:{n}"
        if not isinstance(d, dict) or "question" not in d or not ("source" in d or "gold" in d):
            raise ValueError(f"{where}: each question needs 'question' and 'source' (or a 'gold' list)")
        golds = d.get("gold", [d])
        if not isinstance(golds, list) or not golds:
            raise ValueError(f"{where}: 'gold' must be a non-empty list of passages")
        items.append(QAItem(d["question"], tuple(_gold(g, where) for g in golds), str(d.get("id", n))))
    return items


def _same_file(hit_source: str, gold: str) -> bool:
    """Gold paths are relative to the ingested folder; hit sources may carry a longer prefix."""
    hit_source, gold = hit_source.replace("\\", "/"), gold.replace("\\", "/").lstrip("./")
    return hit_source == gold or hit_source.endswith("/" + gold)


def matches(hit: Hit, gold: Gold, match: str = "any") -> bool:
    """Does `hit` hold `gold`? Same file, then by span, else by heading, else the file is enough.

    Spans: `any` counts any character overlap; `exact` needs one to contain the other (the chunk
    lies inside the gold section, or holds the whole gold passage), so a chunk that only
    touches the gold text at a border does not count.
    """
    if not _same_file(hit.source, gold.source):
        return False
    if gold.span is not None:
        start, end = hit.metadata.get("start"), hit.metadata.get("end")
        if start is None or end is None:
            return False
        if match == "exact":
            return gold.span[0] <= start and end <= gold.span[1] or start <= gold.span[0] and gold.span[1] <= end
        return start < gold.span[1] and gold.span[0] < end
    if gold.heading:
        last = hit.header_path.split(" › ")[-1].strip() if hit.header_path else ""
        return last == gold.heading.strip()
    return True


def is_gold(hit: Hit, item: QAItem, match: str = "any") -> bool:
    """A hit answers `item` when it holds any of its gold passages."""
    return any(matches(hit, g, match) for g in item.gold)


def qa_ranking(hits: Sequence[Hit], item: QAItem, match: str = "any") -> tuple[list[str], dict[str, int]]:
    """Turn a QA item's hits into (ranking, qrels) so `evaluate` scores it like BEIR."""
    ranked = [f"{i}:{'gold' if is_gold(h, item, match) else 'miss'}" for i, h in enumerate(hits)]
    return ranked, {r: 1 for r in ranked if r.endswith(":gold")} or {"none": 1}
