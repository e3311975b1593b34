"""Files that cannot be ingested are skipped with a reason, counted, and printed: never dropped silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest.loader import Document, Skip, load
from tests.rag_core.conftest import cli_env, do_ingest, open_store, rows, run_cli

REASONS = {
    "empty.md": "empty file",
    "only_front_matter.md": "only front matter",
    "huge.md": "MB limit",
    "image.md": "binary file",
    "latin1.md": "not UTF-8",
}


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    root.mkdir()
    (root / "good.md").write_text("# Good\n\nMilvus keeps vectors in segments.\n")
    (root / "bom.md").write_bytes("\ufeff# BOM\n\nA UTF-8 file with a byte-order mark.\n".encode())
    (root / "empty.md").write_bytes(b"")
    (root / "only_front_matter.md").write_text("---\ntitle: nothing else\n---\n\n")
    (root / "huge.md").write_text("# Huge\n\n" + "word " * 5000)  # 25 kB against a 0.01 MB limit
    (root / "image.md").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (root / "latin1.md").write_bytes("# Café\n\nCrème brûlée, encoded as Latin-1.\n".encode("latin-1"))
    (root / "notes.rst").write_text("not matched by the default globs, so not a skip either\n")
    return root


def test_load_reasons(messy: Path):
    for name, reason in REASONS.items():
        got = load(messy / name, max_bytes=10_000)
        assert isinstance(got, Skip), name
        assert reason in got.reason and "\n" not in got.reason, (name, got.reason)
    bom = load(messy / "bom.md", max_bytes=10_000)
    assert isinstance(bom, Document) and bom.text.startswith("# BOM")


def test_ingest_counts_every_skip(messy: Path, milvus_uri: str, embedder):
    report = do_ingest([messy], milvus_uri, embedder, max_file_mb=0.01)
    skipped = {Path(src).name: reason for src, reason in report.skipped}
    assert set(skipped) == set(REASONS)
    assert report.files_skipped == len(REASONS)
    assert report.files_new == 2  # good.md and bom.md; nothing else vanished
    store = open_store(milvus_uri, embedder)
    try:
        assert {Path(r["source"]).name for r in rows(store).values()} == {"good.md", "bom.md"}
    finally:
        store.close()


def test_cli_prints_one_line_per_skip(messy: Path):
    cwd = messy.parent
    args = ["docs", "--uri", str(cwd / "m.db"), "--max-file-mb", "0.01", "--dry-run", "--quiet"]
    res = run_cli("ingest.cli", *args, cwd=cwd, env=cli_env())
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("skipped ")]
    assert len(lines) == len(REASONS)
    for name, reason in REASONS.items():
        assert [ln for ln in lines if ln.startswith(f"skipped docs/{name}: ") and reason in ln], name
    assert f"{len(REASONS)} skipped" in res.stdout

    res = run_cli("ingest.cli", *args, "--json", cwd=cwd, env=cli_env())
    out = json.loads(res.stdout)  # warnings must not leak into the JSON on stdout
    assert out["files_skipped"] == len(REASONS)
    assert {Path(s).name for s, _ in out["skipped"]} == set(REASONS)
