"""notebooks/rag_walkthrough.ipynb: stored clean, and it runs headless on the offline defaults."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "rag_walkthrough.ipynb"
# A small corpus keeps the run short; ingest.md answers the notebook's question.
CORPUS = ["ingest.md", "retrieval.md", "configuration.md", "llm-backends.md"]
# Settings that would send the run to a network service or another database.
ONLINE_SETTINGS = [
    "DEEPSEEK_API_KEY", "LLM_BASE_URL", "LLM_MODEL", "LLM_API_KEY", "MILVUS_URI", "MILVUS_TOKEN",
    "RAG_COLLECTION", "RAG_EMBEDDER", "RAG_MODE", "WALKTHROUGH_SERVER_URI",
]


def _notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_stored_without_outputs():
    nb = _notebook()
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {i} has stored outputs"


def test_every_step_is_explained():
    nb = _notebook()
    kinds = [c.cell_type for c in nb.cells]
    assert kinds[0] == "markdown"
    # no two code cells in a row without a markdown explanation in between, except short follow-ups
    runs = "".join("c" if k == "code" else "m" for k in kinds)
    assert "ccc" not in runs, runs
    text = "\n".join(c.source for c in nb.cells)
    for needle in (
        "git+https://github.com/<org>/<repo>", "restart the runtime", "Chunker", "MilvusStore", "IP",
        "build_prompt", "DEEPSEEK_API_KEY", "make-checkpoint", "model-host serve", "retrieval-only",
        "1,152" if "1,152" in text else "latent_bytes", "MILVUS_TOKEN", "Zilliz Cloud",
    ):
        assert needle in text, needle


@pytest.fixture
def kernel_name(tmp_path: Path, monkeypatch) -> str:
    """A kernelspec for this interpreter (the venv), ahead of any other `python3` on JUPYTER_PATH."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "rag-walkthrough"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "rag walkthrough (test)", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "rag-walkthrough"


@pytest.mark.slow
def test_notebook_runs_headless(tmp_path: Path, monkeypatch, kernel_name: str):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in CORPUS:
        shutil.copy(REPO / "docs" / name, docs / name)
    work = tmp_path / "work"
    work.mkdir()
    for var in ONLINE_SETTINGS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAG_NOTEBOOK_DOCS", str(docs))

    nb = _notebook()
    client = NotebookClient(
        nb, kernel_name=kernel_name, timeout=300, startup_timeout=120,
        resources={"metadata": {"path": str(work)}},
    )
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"notebook cell failed:\n{e}")
    seconds = time.perf_counter() - t0

    outputs = "\n".join(
        o.get("text", "") if o.get("output_type") == "stream" else json.dumps(o.get("data", {}))
        for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    backend = next((line for line in outputs.splitlines() if line.startswith("backend:")), "backend: ?")
    print(f"notebook ran in {seconds:.0f} s; {backend}")
    assert "dimension:   384" in outputs
    assert '"score"' in outputs and "ingest.md" in outputs
    assert "0 new, 0 changed, 4 unchanged" in outputs, "the pipeline must find the hand-ingested files unchanged"
    assert "metric: IP" in outputs
    assert "1,152 bytes per token per layer" in outputs and "81,920 bytes" in outputs
    assert "status:" in outputs and "done" in outputs
    assert (work / "data" / "walkthrough.db").exists(), "the Milvus Lite db goes to the working directory"
