"""The Knowledge-base tab's tables: the collection's settings, one row per file, a file's chunks.

The store knows what is indexed (chunks per file, and whether a file's chunks are complete);
the UI's ingest log (`History.record_ingest`) knows what it skipped or failed and when; the disk
knows sizes. A file ingested by `rag-ingest` has no log row, so it shows the collection's last
ingest time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rag.store import FileState
from rag.types import Hit
from ui.citations import source_path

FILE_HEADERS = ["Source", "Chunks", "Size", "Last ingest", "Embedder", "Status"]
CHUNK_HEADERS = ["#", "Heading path", "Characters", "Text"]
CHUNK_PREVIEW = 300
METRICS = {"IP": "inner product (cosine)", "COSINE": "cosine", "L2": "Euclidean"}


def collection_markdown(collection: str, stats: dict[str, Any] | None) -> str:
    """The collection's own settings: rows, embedder, dimension, metric, analyzer, last ingest."""
    if stats is None:
        return (f"Collection **{collection}** does not exist yet: ingest documents first. "
                f"Upload files below and press **Ingest**; the collection is created on the first run.")
    analyzer = stats.get("analyzer") or "?"
    if analyzer == "none":
        analyzer = "none (dense only)"
    return (
        "| Collection | Files | Rows (chunks) | Embedder | Dimension | Metric | BM25 analyzer | Last ingest |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {collection} | {stats['files']} | {stats['chunks']} | {stats['embedder'] or '?'} | {stats['dim'] or '?'} | "
        f"{METRICS.get(stats.get('metric') or '', stats.get('metric') or '?')} | {analyzer} | "
        f"{stats['last_ingest'] or 'never'} |"
    )


def human_size(n: int | None) -> str:
    if n is None:
        return "not on disk"
    for unit in ("B", "kB", "MB"):
        if n < 1000 or unit == "MB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return ""


def complete(state: FileState) -> bool:
    """One version stored, with all of its chunks (a killed run leaves fewer, or two versions)."""
    return len(state.ids_by_hash) == 1 and all(
        len(set(ids)) == state.expected.get(h, -1) for h, ids in state.ids_by_hash.items())


def file_rows(stats: dict[str, Any] | None, states: dict[str, FileState],
              log: dict[str, tuple[str, str, str]], uploads_root: Path) -> list[list[Any]]:
    """One row per file the collection holds or the UI's ingest skipped or failed."""
    stats = stats or {}
    rows = []
    for src in sorted(set(states) | set(log)):
        state, logged = states.get(src), log.get(src)
        if state is None:  # nothing stored: the log says why
            status = f"{logged[0]}: {logged[1]}" if logged else "not indexed"
        elif not complete(state):
            status = "incomplete: re-ingest it"
        elif logged and logged[0] != "indexed":
            status = f"indexed (an older version; last ingest {logged[0]}: {logged[1]})"
        else:
            status = "indexed"
        path = source_path(src, uploads_root)
        size = path.stat().st_size if path is not None else None
        when = logged[2] if logged else (stats.get("last_ingest") or "")
        rows.append([src, len(set(state.ids)) if state else 0, human_size(size), when,
                     (stats.get("embedder") or "") if state else "", status])
    return rows


def chunk_rows(chunks: list[Hit]) -> list[list[Any]]:
    out = []
    for c in chunks:
        text = " ".join(c.text.split())
        preview = text if len(text) <= CHUNK_PREVIEW else text[: CHUNK_PREVIEW - 1] + "…"
        out.append([c.chunk_index + 1, c.header_path, len(c.text), preview])
    return out

