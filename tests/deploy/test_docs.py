"""The user docs and README: generated tables in sync, links resolve, and every setting, flag
and variable they mention exists in the code."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO
from tools import settings_table

DOCS = REPO / "docs"
# The user guide's pages (the demo corpus: each chunks under its own title); the model host,
# benchmark and GPU-notes pages are reference pages. Every page gets the link, variable, flag and
# structure checks; a page in docs/ on neither list fails test_every_page_is_checked.
OWN_PAGES = [
    "overview.md", "quickstart.md", "configuration.md", "ingest.md", "retrieval.md", "embedders.md",
    "llm-backends.md", "ui.md", "deployment.md", "milvus-server.md", "troubleshooting.md", "cli.md",
]
REFERENCE_PAGES = ["model_host.md", "benchmarks.md", "gpu_notes.md"]
ALL_PAGES = OWN_PAGES + REFERENCE_PAGES
LINK_RE = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING_RE = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
ENV_RE = re.compile(r"\b((?:RAG|LLM|MILVUS|DEEPSEEK)_[A-Z0-9_]*[A-Z0-9])\b")
FENCE_RE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *(DOCS / p for p in ALL_PAGES)]


def _strip_fences(text: str) -> str:
    return FENCE_RE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*|_(?=\w)|\[|\]\([^)]*\)", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _strip_fences(path.read_text(encoding="utf-8"))
    return {_slug(m.group(2)) for line in text.splitlines() if (m := HEADING_RE.match(line))}


def _setting_vars() -> set[str]:
    """Env names of every settings class (an import error fails the calling test: every package
    of the repository must import, or its settings would go unchecked)."""
    names: set[str] = set()
    for _heading, module, cls_name in settings_table.SETTINGS:
        cls = getattr(importlib.import_module(module), cls_name)
        names |= {var for var, _default, _help in settings_table.settings_table(cls)}
    return names


def _compose_vars() -> set[str]:
    text = (REPO / "docker-compose.yml").read_text(encoding="utf-8")
    return set(re.findall(r"\$\{([A-Z0-9_]+)", text))


def test_generated_tables_are_in_sync():
    stale = settings_table.stale_files()
    assert not stale, (
        f"out of date: {', '.join(stale)}; run `.venv/bin/python tools/settings_table.py --write`"
    )


def test_settings_tables_list_every_setting():
    names = _setting_vars()
    for rel in ("README.md", "docs/configuration.md"):
        text = (REPO / rel).read_text(encoding="utf-8")
        absent = sorted(n for n in names if f"| `{n}` |" not in text)
        assert not absent, f"{rel} lacks table rows for {absent}"


def test_every_page_is_checked():
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages == set(ALL_PAGES), (
        f"unlisted pages {sorted(pages - set(ALL_PAGES))}, missing pages {sorted(set(ALL_PAGES) - pages)}: "
        "list every docs/ page in OWN_PAGES or REFERENCE_PAGES of this file")


@pytest.mark.parametrize("page", ALL_PAGES)
def test_doc_page_structure(page: str):
    path = DOCS / page
    assert path.exists(), f"docs/{page} is missing"
    text = path.read_text(encoding="utf-8")
    lines = _strip_fences(text).splitlines()
    headings = [(len(m.group(1)), m.group(2)) for line in lines if (m := HEADING_RE.match(line))]
    assert headings and headings[0][0] == 1 and text.startswith("# "), f"{page} must start with one H1"
    assert sum(1 for level, _ in headings if level == 1) == 1, f"{page} has more than one H1"
    assert sum(1 for level, _ in headings if level == 2) >= 3, f"{page} needs sections (## headings) for the chunker"


def test_doc_corpus_size():
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    own = [p for p in pages if p in OWN_PAGES]
    assert 8 <= len(own) <= 12, own


def test_links_resolve():
    problems = []
    for path in _markdown_files():
        text = _strip_fences(path.read_text(encoding="utf-8"))
        for target in LINK_RE.findall(text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            rel = dest.relative_to(REPO).as_posix() if dest.is_relative_to(REPO) else str(dest)
            if not dest.exists():
                problems.append(f"{path.name}: {target} ({rel} does not exist)")
                continue
            if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                problems.append(f"{path.name}: {target} (no such heading)")
    assert not problems, problems


def test_env_vars_mentioned_exist():
    """Every RAG_/LLM_/MILVUS_/DEEPSEEK_ name in the docs is a setting or a compose variable."""
    known = _setting_vars() | _compose_vars()
    unknown = {}
    for path in [*_markdown_files(), REPO / "docker-compose.yml"]:
        for var in ENV_RE.findall(path.read_text(encoding="utf-8")):
            if var not in known:
                unknown.setdefault(var, path.name)
    assert not unknown, f"names that no settings class reads and compose does not define: {unknown}"


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every documented command's parser (an import error fails the calling test)."""
    from model_host.cli import build_parser

    out = {command: getattr(importlib.import_module(module), factory)()
           for command, module, factory in settings_table.COMMANDS}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        out[f"model-host {name}"] = p
    return out


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_cli_flags_in_examples_exist():
    """Flags in the shell examples of the docs are flags the commands accept."""
    parsers = _parsers()
    problems = []
    for path in _markdown_files():
        for block in FENCE_RE.findall(path.read_text(encoding="utf-8")):
            for line in block.splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith("$ "):
                    line = line[2:]
                try:
                    words = shlex.split(line)
                except ValueError:
                    continue
                while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value prefixes
                    words = words[1:]
                if not words:
                    continue
                cmd = words[0].rsplit("/", 1)[-1]
                if cmd == "model-host" and len(words) > 1:
                    cmd = f"model-host {words[1]}"
                if cmd not in ("rag-ingest", "rag-ask", "rag-ui") and not cmd.startswith("model-host "):
                    continue
                if cmd not in parsers:
                    problems.append(f"{path.name}: `{line}` runs {cmd!r}, which is no command of this repository")
                    continue
                flags = {w.split("=")[0] for w in words[1:] if w.startswith("--")}
                bad = flags - _options(parsers[cmd])
                if bad:
                    problems.append(f"{path.name}: `{line}` uses {sorted(bad)}")
    assert not problems, problems


def test_readme_covers_the_brief():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for needle in (
        "make run", "make test", "```mermaid", "docker compose up -d", "docs/images/ui.png",
        "docs/benchmarks.md", "docs/model_host.md", "690 GB", "8 × H200", "8 × H100", "helm install",
        "Milvus Operator", "milvus-lite dump", "bulk_import", "ui-api",
    ):
        assert needle in text, f"README.md lacks {needle!r}"


def test_docs_load_and_chunk_cleanly(embedder):
    """The demo corpus itself: nothing skipped, and every page chunks under its own title."""
    from ingest.chunker import Chunker
    from ingest.config import DEFAULT_GLOBS
    from ingest.loader import Skip, discover, load

    found = discover([str(DOCS)], DEFAULT_GLOBS.split(","))
    chunker = Chunker(embedder.count_tokens, embedder.max_tokens)
    for f in found.files:
        doc = load(f, int(5e6))
        assert not isinstance(doc, Skip), doc
        if f.name not in OWN_PAGES:
            continue
        chunks = chunker.chunk(doc)
        title = doc.text.splitlines()[0].lstrip("# ").strip()
        assert len(chunks) >= 3, f.name
        assert all(c.header_path and c.header_path[0] == title for c in chunks), f.name
