"""The knowledge base you can see into (issue 20.3): the collection's settings, one row per file
with chunks, size, last ingest, embedder and status, a file's chunks, re-ingest, and progress."""

from __future__ import annotations

import time
from pathlib import Path

from gradio_client import handle_file

from rag.store import FileState
from ui.kb_files import collection_markdown, file_rows, human_size

STATS = {"files": 1, "chunks": 2, "embedder": "sentence-transformers/all-MiniLM-L6-v2", "dim": 384,
         "metric": "IP", "analyzer": "standard", "last_ingest": "2026-12-05T08:00:00+00:00"}


def _state(expected: int, *ids: str) -> FileState:
    st = FileState()
    st.ids_by_hash["h1"].extend(ids)
    st.expected["h1"] = expected
    return st


def test_file_rows_join_the_store_the_ingest_log_and_the_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("docs").mkdir()
    Path("docs/a.md").write_text("x" * 1500)
    states = {"docs/a.md": _state(2, "i1", "i2"), "docs/b.md": _state(3, "j1")}
    log = {"uploads/empty.md": ("skipped", "empty file", "2026-12-05T08:01:00+00:00"),
           "docs/a.md": ("indexed", "", "2026-12-05T08:02:00+00:00")}
    rows = file_rows(STATS, states, log, tmp_path / "uploads")
    assert rows == [
        ["docs/a.md", 2, "1.5 kB", "2026-12-05T08:02:00+00:00", STATS["embedder"], "indexed"],
        ["docs/b.md", 1, "not on disk", STATS["last_ingest"], STATS["embedder"], "incomplete: re-ingest it"],
        ["uploads/empty.md", 0, "not on disk", "2026-12-05T08:01:00+00:00", "", "skipped: empty file"],
    ]
    assert human_size(999) == "999 B" and human_size(2_500_000) == "2.5 MB"
    md = collection_markdown("docs", STATS)
    assert "| docs | 1 | 2 | sentence-transformers/all-MiniLM-L6-v2 | 384 | inner product (cosine) | standard |" in md


def test_files_table_chunks_and_reingest(app, client, tmp_path):
    good = tmp_path / "guide.md"
    good.write_text("# Guide\n\n## Install\n\nRun the installer.\n\n## Upgrade\n\nRun it again with --upgrade.\n")
    empty = tmp_path / "empty.md"
    empty.write_text("")
    report, stats_md, table, _, _ = client.predict([handle_file(str(good)), handle_file(str(empty))], "kbview",
                                                   api_name="/ingest")
    assert "| Collection | Files | Rows (chunks) | Embedder | Dimension | Metric | BM25 analyzer |" in stats_md
    assert "inner product (cosine)" in stats_md
    assert table["headers"] == ["Source", "Chunks", "Size", "Last ingest", "Embedder", "Status"]
    rows = {r[0]: r for r in table["data"]}
    assert rows["uploads/guide.md"][1] >= 1 and rows["uploads/guide.md"][2].endswith(" B")
    assert rows["uploads/guide.md"][4].endswith("all-MiniLM-L6-v2") and rows["uploads/guide.md"][5] == "indexed"
    assert rows["uploads/empty.md"][1] == 0 and rows["uploads/empty.md"][5].startswith("skipped: ")

    chunks = client.predict("kbview", "uploads/guide.md", api_name="/file_chunks")
    assert chunks["headers"] == ["#", "Heading path", "Characters", "Text"]
    text = " ".join(str(c) for r in chunks["data"] for c in r)
    assert "Guide › Upgrade" in text and "Run it again with --upgrade." in text

    good.write_text("# Guide\n\n## Install\n\nRun the new installer.\n")  # the stored upload is unchanged
    note, _, table, _ = client.predict("kbview", "uploads/guide.md", api_name="/reingest")
    assert note.startswith("Re-ingested **uploads/guide.md**:") and "chunks written" in note
    assert {r[0]: r[5] for r in table["data"]}["uploads/guide.md"] == "indexed"
    note, *_ = client.predict("kbview", "docs/nowhere.md", api_name="/reingest")
    assert "not on this server's disk" in note


def test_upload_reports_files_and_chunks_done_while_it_runs(app, client, tmp_path):
    """The progress bar counts files read and chunks embedded (ingest's tqdm bars, relayed)."""
    files = []
    for i in range(12):
        f = tmp_path / f"note{i}.md"
        f.write_text(f"# Note {i}\n\n" + "\n\n".join(f"## Part {j}\n\n" + f"Paragraph {i}.{j} " * 40 for j in range(6)))
        files.append(handle_file(str(f)))
    job = client.submit(files, "progress", api_name="/ingest")
    seen: set[tuple[str, str]] = set()
    while not job.done():
        for unit in job.status().progress_data or []:
            seen.add((unit.desc or "", unit.unit or ""))
        time.sleep(0.02)
    assert "**Ingested 12 files**" in job.result()[0]
    units = {u for _, u in seen}
    assert "chunk" in units, seen  # the embedding bar: chunks done of the total
