"""Conversations, answer feedback and the UI's ingest log, in one SQLite file under the data dir.

Each conversation belongs to a user: the login's name when the UI has a password, else a random
id the browser keeps in its localStorage ("browser:<id>"). A conversation stores the Gradio
messages as shown, its settings, and per answer a `Turn`: the question, the retrieved passages
(ids, files, headings, offsets) and the settings that produced it. Turns feed the citation
panel after a reload, the markdown export, and feedback, which `qa_lines` turns into a QA file
for `rag-eval qa` (a thumbs-up answer's first cited passage is its gold passage).

The standard library's sqlite3 with one connection per process behind a lock: the UI's writes
are a few rows per answer, far below what would need a pool.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from rag.types import Hit

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, title TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL,
    settings TEXT NOT NULL, messages TEXT NOT NULL, turns TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_user ON conversations (user, updated);
CREATE TABLE IF NOT EXISTS feedback (
    conversation TEXT NOT NULL, turn INTEGER NOT NULL, user TEXT NOT NULL, liked INTEGER NOT NULL,
    question TEXT NOT NULL, answer TEXT NOT NULL, hits TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (conversation, turn)
);
CREATE TABLE IF NOT EXISTS ingests (
    collection TEXT NOT NULL, source TEXT NOT NULL, status TEXT NOT NULL, reason TEXT NOT NULL,
    at TEXT NOT NULL, PRIMARY KEY (collection, source)
);
"""
TITLE_CHARS = 60
CITATION_RE = re.compile(r"\[(\d+)\]")


@dataclasses.dataclass(frozen=True)
class Passage:
    """What a citation needs of a retrieved hit, stored with the answer that cited it."""

    n: int  # the [n] of the answer
    id: str
    source: str
    header_path: str
    score: str  # Hit.score_label(), as shown in the Sources panel
    start: int | None = None
    end: int | None = None

    @classmethod
    def of(cls, n: int, hit: Hit) -> Passage:
        start, end = hit.metadata.get("start"), hit.metadata.get("end")
        return cls(n, hit.id, hit.source, hit.header_path, hit.score_label(),
                   int(start) if start is not None else None, int(end) if end is not None else None)


@dataclasses.dataclass
class Turn:
    """One answered question: what was asked, answered, retrieved, and with which settings."""

    question: str
    answer: str
    collection: str
    settings: dict[str, Any]
    passages: list[Passage] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Turn:
        return cls(d["question"], d["answer"], d["collection"], d.get("settings") or {},
                   [Passage(**p) for p in d.get("passages") or []])


@dataclasses.dataclass
class Conversation:
    id: str
    user: str
    title: str
    updated: float
    settings: dict[str, Any]
    messages: list[dict[str, Any]]
    turns: list[Turn]


def title_of(question: str) -> str:
    words = " ".join(question.split())
    return words if len(words) <= TITLE_CHARS else words[: TITLE_CHARS - 1].rsplit(" ", 1)[0] + "…"


class History:
    """The conversations database (`DATA_DIR/ui.sqlite3`); every method is scoped to one user."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Gradio runs handlers on worker threads; the lock serialises them on one connection.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, *args: Any) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- conversations -----------------------------------------------------------------------

    def list(self, user: str) -> list[tuple[str, str, float]]:
        """(id, title, updated) of the user's conversations, newest first."""
        return [tuple(r) for r in self._run(
            "SELECT id, title, updated FROM conversations WHERE user = ? ORDER BY updated DESC", user)]

    def get(self, user: str, conv_id: str | None) -> Conversation | None:
        if not conv_id:
            return None
        rows = self._run("SELECT id, user, title, updated, settings, messages, turns FROM conversations "
                         "WHERE id = ? AND user = ?", conv_id, user)
        if not rows:
            return None
        cid, owner, title, updated, settings, messages, turns = rows[0]
        return Conversation(cid, owner, title, updated, json.loads(settings), json.loads(messages),
                            [Turn.from_json(t) for t in json.loads(turns)])

    def save(self, user: str, conv_id: str | None, messages: list[dict[str, Any]], turns: list[Turn],
             settings: dict[str, Any]) -> str:
        """Create (under `conv_id` when new) or update a conversation; returns its id.

        The first question titles it."""
        now = time.time()
        body = (json.dumps(settings), json.dumps(messages), json.dumps([t.to_json() for t in turns]))
        owner = self._run("SELECT user FROM conversations WHERE id = ?", conv_id) if conv_id else []
        if owner and owner[0][0] == user:
            self._run("UPDATE conversations SET updated = ?, settings = ?, messages = ?, turns = ? "
                      "WHERE id = ? AND user = ?", now, *body, conv_id, user)
            return conv_id
        if owner or not conv_id:  # never write into another user's conversation
            conv_id = uuid.uuid4().hex
        title = title_of(turns[0].question) if turns else "New chat"
        self._run("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?, ?, ?)", conv_id, user, title, now, now, *body)
        return conv_id

    def rename(self, user: str, conv_id: str, title: str) -> bool:
        title = " ".join(title.split())[:200]
        if not title:
            return False
        with self._lock:
            cur = self._db.execute("UPDATE conversations SET title = ? WHERE id = ? AND user = ?",
                                   (title, conv_id, user))
            return cur.rowcount == 1

    def delete(self, user: str, conv_id: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM conversations WHERE id = ? AND user = ?", (conv_id, user))
            self._db.execute("DELETE FROM feedback WHERE conversation = ? AND user = ?", (conv_id, user))
            return cur.rowcount == 1

    # -- ingest log ----------------------------------------------------------------------------

    def record_ingest(self, collection: str, results: list[tuple[str, str, str]], at: str) -> None:
        """What the UI's last ingest did to each file: (source, status, reason); status is
        indexed, skipped or failed. The Knowledge-base table shows it next to the stored rows."""
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO ingests VALUES (?, ?, ?, ?, ?)",
                                 [(collection, src, status, reason, at) for src, status, reason in results])

    def ingest_log(self, collection: str) -> dict[str, tuple[str, str, str]]:
        """source -> (status, reason, ISO time) of the UI's last ingest of it."""
        rows = self._run("SELECT source, status, reason, at FROM ingests WHERE collection = ?", collection)
        return {src: (status, reason, at) for src, status, reason, at in rows}

    def forget_ingest(self, collection: str, source: str) -> None:
        self._run("DELETE FROM ingests WHERE collection = ? AND source = ?", collection, source)

    # -- feedback ----------------------------------------------------------------------------

    def feedback(self, user: str, conv_id: str, turn: int, liked: bool | None) -> None:
        """Record (or with None, withdraw) a thumbs up/down on answer number `turn`."""
        conv = self.get(user, conv_id)
        if conv is None or not 0 <= turn < len(conv.turns):
            raise KeyError(f"no answer {turn} in conversation {conv_id}")
        if liked is None:
            self._run("DELETE FROM feedback WHERE conversation = ? AND turn = ?", conv_id, turn)
            return
        t = conv.turns[turn]
        hits = json.dumps([dataclasses.asdict(p) for p in t.passages])
        self._run("INSERT OR REPLACE INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                  conv_id, turn, user, int(liked), t.question, t.answer, hits, time.time())

    def feedback_rows(self, user: str | None = None) -> list[dict[str, Any]]:
        """All feedback (of one user, or everyone's for an export by the operator)."""
        sql = "SELECT conversation, turn, user, liked, question, answer, hits, created FROM feedback"
        rows = self._run(sql + " WHERE user = ? ORDER BY created", user) if user else self._run(sql + " ORDER BY created")
        keys = ("conversation", "turn", "user", "liked", "question", "answer", "hits", "created")
        return [{**dict(zip(keys, r, strict=True)), "liked": bool(r[3]), "hits": json.loads(r[6])} for r in rows]


def qa_lines(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rag-eval qa` items from liked answers: the first cited passage (else the top one) is gold.

    A disliked answer says the passages were wrong, not which one is right, so it gives no item.
    """
    out = []
    for r in rows:
        if not r["liked"] or not r["hits"]:
            continue
        cited = _cited(r["answer"])
        gold = next((h for h in r["hits"] if h["n"] in cited), r["hits"][0])
        item: dict[str, Any] = {"id": f"{r['conversation'][:8]}-{r['turn']}", "question": r["question"],
                                "source": gold["source"]}
        if gold["header_path"]:
            item["heading"] = gold["header_path"].split(" › ")[-1]
        if gold.get("start") is not None and gold.get("end") is not None:
            item["span"] = [gold["start"], gold["end"]]
        out.append(item)
    return out


def _cited(answer: str) -> set[int]:
    return {int(n) for n in CITATION_RE.findall(answer)}


def export_markdown(conv: Conversation) -> str:
    """The conversation as markdown: each question, its answer, its settings and its sources."""
    lines = [f"# {conv.title}", ""]
    for t in conv.turns:
        lines += [f"## {t.question}", "", t.answer.strip(), ""]
        s = t.settings
        lines.append(f"*{settings_line(s)} · collection {t.collection}*")
        lines.append("")
        if t.passages:
            lines.append("**Sources**")
            lines.append("")
            for p in t.passages:
                heading = f" › {p.header_path}" if p.header_path else ""
                lines.append(f"- [{p.n}] `{p.source}`{heading} ({p.score})")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def settings_line(s: dict[str, Any]) -> str:
    """'DeepSeek API deepseek-chat · top-k 5 · hybrid · floor 0.30': how an answer was made."""
    model = f" {s['model']}" if s.get("model") else ""
    floor = s.get("score_floor")
    floor_text = f" · floor {floor:.2f}" if isinstance(floor, (int, float)) else ""
    return f"{s.get('backend_label', s.get('backend', '?'))}{model} · top-k {s.get('top_k', '?')} · {s.get('mode', '?')}{floor_text}"
