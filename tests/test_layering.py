"""The package layering the developers' guide documents, checked on the source with `ast`.

`rag` is the base: it imports neither `ingest`, `ui` nor `evals` (they build on it). The app
(`rag`, `ingest`, `ui`, `evals`) reaches `model_host` only over HTTP, so none imports it.
Every import statement counts, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
APP = ("rag", "ingest", "ui", "evals")
FORBIDDEN = {
    "rag": {"ingest", "ui", "evals", "model_host"},
    "ingest": {"model_host"},
    "ui": {"model_host"},
    "evals": {"model_host"},
}


def imported_packages(source: str, package: str) -> set[str]:
    """Top-level package of every module `source` imports (relative imports stay in `package`)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(package if node.level else (node.module or "").split(".")[0])
    return found


def violations(root: Path = REPO) -> list[str]:
    out = []
    for package, banned in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            bad = imported_packages(path.read_text(encoding="utf-8"), package) & banned
            out.extend(f"{path.relative_to(root)} imports {name}" for name in sorted(bad))
    return out


def test_packages_respect_the_layering():
    assert all((REPO / p / "__init__.py").exists() for p in APP)
    assert violations() == []


@pytest.mark.parametrize("source", [
    "import ingest.chunker",
    "from ui.service import KnowledgeBase",
    "def f():\n    from evals import metrics\n",
    "import json, model_host.server as s",
])
def test_the_check_sees_every_kind_of_import(tmp_path: Path, source: str):
    """A planted import in rag/ is reported, so the check above cannot pass vacuously."""
    for package in APP:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("from . import x\n")
    (tmp_path / "rag" / "bad.py").write_text(source + "\n")
    assert len(violations(tmp_path)) == 1, violations(tmp_path)
