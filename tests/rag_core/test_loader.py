"""Files that cannot be ingested are skipped with a reason, counted, and printed: never dropped silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest.config import IngestConfig
from ingest.loader import Document, Skip, load
from ingest.pipeline import ingest
from rag.config import RagConfig
from tests.rag_core.conftest import cli_env, do_ingest, open_store, rows, run_cli, working_dir

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


@pytest.fixture
def looped(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    root.mkdir()
    (root / "good.md").write_text("# Good\n\nMilvus keeps vectors in segments.\n")
    (root / "self.md").symlink_to("self.md")
    (root / "ping.md").symlink_to("pong.md")
    (root / "pong.md").symlink_to("ping.md")
    (root / "gone.md").symlink_to("missing.md")
    return root


def test_symlink_loops_in_a_folder_are_reported_skips(looped: Path, milvus_uri: str, embedder):
    warnings: list[str] = []
    rag_config = RagConfig.load(environ={}, milvus_uri=milvus_uri)
    with working_dir(looped.parent):
        report = ingest(["docs"], rag_config, IngestConfig.load(environ={}), embedder=embedder,
                        progress=False, warn=warnings.append)
    skipped = dict(report.skipped)
    assert set(skipped) == {"docs/self.md", "docs/ping.md", "docs/pong.md", "docs/gone.md"}
    for name in ("self.md", "ping.md", "pong.md"):
        assert skipped[f"docs/{name}"].startswith("symlink loop"), skipped
        assert any(w.startswith(f"skipped docs/{name}: symlink loop") for w in warnings), warnings
    assert "broken symlink to missing.md" in skipped["docs/gone.md"]
    assert report.files_skipped == 4 and report.files_new == 1


def test_a_looped_file_given_directly_is_a_skip_not_missing(looped: Path):
    res = run_cli("ingest.cli", "docs/self.md", "docs/good.md", "--uri", str(looped.parent / "m.db"),
                  "--dry-run", "--quiet", cwd=looped.parent, env=cli_env())
    assert res.returncode == 0, res.stderr
    assert "does not exist" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("skipped ")]
    assert lines == ["skipped docs/self.md: symlink loop (self.md -> self.md never reaches a file); "
                     "point the link at a real file or remove it"], res.stderr
    assert "1 new" in res.stdout and "1 skipped" in res.stdout, res.stdout
