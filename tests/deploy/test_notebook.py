"""notebooks/rag_walkthrough.ipynb: stored clean, and it runs headless on the offline defaults with
the command the README gives (`jupyter nbconvert --to notebook --execute ...`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

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


# How the README tells users to run the notebook headless; the test runs exactly this.
NBCONVERT = ["nbconvert", "--to", "notebook", "--execute", "notebooks/rag_walkthrough.ipynb"]


def test_docs_give_the_headless_command():
    command = "jupyter " + " ".join(NBCONVERT)
    readme = (REPO / "README.md").read_text()
    assert command in readme, f"README.md must show `{command} --output-dir ...`"
    assert f"{command} --output-dir" in readme


def _python_kernel(jupyter_path: Path) -> None:
    """The notebook's `python3` kernel, as this interpreter (the venv), ahead of any other one."""
    spec_dir = jupyter_path / "kernels" / _notebook().metadata.kernelspec.name
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test venv)", "language": "python",
    }))


@pytest.mark.slow
def test_notebook_runs_headless(tmp_path: Path):
    """`jupyter nbconvert --to notebook --execute` on a copy of the repository's notebook folder."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in CORPUS:
        shutil.copy(REPO / "docs" / name, docs / name)
    work = tmp_path / "work"
    (work / "notebooks").mkdir(parents=True)
    shutil.copy(NOTEBOOK, work / "notebooks" / NOTEBOOK.name)
    _python_kernel(tmp_path / "jupyter")
    env = {k: v for k, v in os.environ.items() if k not in ONLINE_SETTINGS}
    env.update(RAG_NOTEBOOK_DOCS=str(docs), JUPYTER_PATH=str(tmp_path / "jupyter"), HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    out = tmp_path / "out"
    # `python -m jupyter` is the `jupyter` command of this venv (jupyter_core's entry point).
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "jupyter", *NBCONVERT, "--output-dir", str(out)],
                         cwd=work, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    assert res.returncode == 0, f"jupyter nbconvert failed:\n{res.stderr[-3000:]}"

    nb = nbformat.read(out / NOTEBOOK.name, as_version=4)
    outputs = "\n".join(
        o.get("text", "") if o.get("output_type") == "stream" else json.dumps(o.get("data", {}))
        for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    backend = next((line for line in outputs.splitlines() if line.startswith("backend:")), "backend: ?")
    print(f"notebook ran in {seconds:.0f} s; {backend}")
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), "every code cell ran"
    assert "dimension:   384" in outputs
    assert '"score"' in outputs and "ingest.md" in outputs
    assert "0 new, 0 changed, 4 unchanged" in outputs, "the pipeline must find the hand-ingested files unchanged"
    assert "metric: IP" in outputs
    assert "1,152 bytes per token per layer" in outputs and "81,920 bytes" in outputs
    assert "status:" in outputs and "done" in outputs
    # the kernel runs in notebooks/; the db goes to the repository's git-ignored data/ folder
    assert (work / "data" / "walkthrough.db").exists()
