"""Helpers for the foundation tests: CLI subprocesses, reading a collection back, small corpora."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.config import IngestConfig
from ingest.pipeline import IngestReport, ingest
from rag.config import RagConfig
from rag.store import MilvusStore
from tests.conftest import REPO

VENV_BIN = Path(sys.executable).parent


def cli_env(**extra: str) -> dict[str, str]:
    """A clean environment for a CLI subprocess: no LLM or RAG_* settings leak in from the caller."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAG_", "LLM_", "MILVUS_", "DEEPSEEK_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(REPO)  # the editable install finds the package too; this keeps it explicit
    # fp32 MiniLM, as the session `embedder` these tests read a CLI-built collection back with
    # (new collections default to int8 on the CPU; tests/rag_core/test_embedder_variant.py covers that).
    env["RAG_EMBED_INT8"] = "0"
    env.update(extra)
    return env


def run_cli(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run `python -m module args...` the way a user runs rag-ingest / rag-ask."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env or cli_env(),
        capture_output=True, text=True, timeout=timeout,
    )


def rows(store: MilvusStore) -> dict[str, dict]:
    """Every row of the collection by id (text, source, file_hash, chunk_count, vector)."""
    out: dict[str, dict] = {}
    it = store.client.query_iterator(
        store.collection, batch_size=1000, filter="",
        output_fields=["text", "source", "file_hash", "chunk_count", "chunk_index", "vector"],
        consistency_level="Strong",
    )
    try:
        while batch := it.next():
            for r in batch:
                out[r["id"]] = r
    finally:
        it.close()
    return out


@contextlib.contextmanager
def working_dir(path: Path | None) -> Iterator[None]:
    """Run a block in `path`: source names are relative to the working directory, as in the CLI."""
    old = os.getcwd()
    if path is not None:
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def do_ingest(paths: list[str | Path], uri: str, embedder, cwd: Path | None = None, **overrides) -> IngestReport:
    """In-process ingest with the session embedder (no model load, no subprocess start-up)."""
    rag_config = RagConfig.load(environ={}, milvus_uri=uri, collection="docs")
    recreate = overrides.pop("recreate", False)
    config = IngestConfig.load(environ={}, **overrides)
    with working_dir(cwd):
        return ingest([str(p) for p in paths], rag_config, config, embedder=embedder,
                      recreate=recreate, progress=False, warn=lambda _msg: None)


def snapshot(uri: str, embedder) -> dict[str, dict]:
    """All rows of the db at `uri`, opened and closed again."""
    store = open_store(uri, embedder)
    try:
        return rows(store)
    finally:
        store.close()


def open_store(uri: str, embedder) -> MilvusStore:
    store = MilvusStore(uri, "docs")
    store.open_existing(embedder)
    return store


def write_corpus(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


def small_doc(title: str, topic: str, sections: int = 3) -> str:
    """A short markdown page with a few sections, about one chunk each."""
    parts = [f"# {title}\n\nThis page explains {topic} in the Milvus vector database.\n"]
    for i in range(sections):
        parts.append(
            f"## {topic.title()} part {i + 1}\n\n"
            f"Part {i + 1} of {topic}: collections hold entities, each with a primary key and a vector. "
            f"Indexes such as HNSW and IVF_FLAT speed up search over {topic}.\n"
        )
    return "\n".join(parts)


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """Four small markdown files in tmp_path/docs."""
    return write_corpus(tmp_path / "docs", {
        "alpha.md": small_doc("Alpha", "data storage"),
        "beta.md": small_doc("Beta", "index building"),
        "sub/gamma.md": small_doc("Gamma", "query consistency"),
        "sub/delta.md": small_doc("Delta", "partition keys"),
    })


@pytest.fixture(scope="session")
def faq_store(tmp_path_factory, embedder) -> Iterator[MilvusStore]:
    """The four Milvus FAQ pages ingested once (68 chunks), held open for in-process retrieval.

    Session-scoped and the only handle on its db: Milvus Lite allows one client per path at a time.
    """
    from tests.conftest import shared_data

    uri = str(tmp_path_factory.mktemp("faq") / "faq.db")
    do_ingest([shared_data("milvus_docs_en") / "faq"], uri, embedder)
    store = open_store(uri, embedder)
    yield store
    store.close()
