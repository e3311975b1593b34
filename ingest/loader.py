"""Find markdown/text files and read them, reporting every file that cannot be used.

Nothing is skipped silently: a binary, non-UTF-8, empty or oversized file yields a `Skip`
with one line that says why and how to fix it; the CLI prints each and counts them.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

FRONT_MATTER_RE = re.compile(r"\A---[ \t]*\r?\n(.*?\r?\n)?---[ \t]*(\r?\n|\Z)", re.DOTALL)
TEXT_SUFFIXES = {".md", ".markdown", ".txt"}


@dataclasses.dataclass(frozen=True)
class Document:
    source: str  # stable display path: relative to the working directory when inside it
    text: str  # the whole file, front matter included, so chunk offsets index the real file
    body_start: int  # where the content after front matter begins
    file_hash: str  # sha256 of the bytes
    metadata: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Skip:
    source: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Discovered:
    files: list[Path]
    roots: list[str]  # source prefixes of the folders given; files gone from them are pruned
    skipped: list[Skip] = dataclasses.field(default_factory=list)  # symlinks that lead to no file


def source_name(path: Path) -> str:
    """Relative to the working directory when inside it, else absolute; always POSIX."""
    p = path.resolve()
    try:
        return p.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return p.as_posix()


def broken_link(path: Path, name: Callable[[Path], str] = source_name) -> Skip | None:
    """A Skip for a symlink that leads to no file (a loop, or a missing target), else None."""
    if not path.is_symlink() or path.exists():
        return None
    source = (Path(name(path.parent)) / path.name).as_posix()  # the link's own name: no target
    try:
        path.resolve(strict=True)
    except RuntimeError:  # pathlib's "Symlink loop from ..."
        return Skip(source, f"symlink loop ({path.name} -> {os.readlink(path)} never reaches a file); "
                            f"point the link at a real file or remove it")
    except OSError:
        pass
    return Skip(source, f"broken symlink to {os.readlink(path)}, which does not exist; fix or remove the link")


def discover(paths: Sequence[str], globs: Sequence[str], name: Callable[[Path], str] = source_name) -> Discovered:
    """Expand folders (with `globs`), files and glob patterns into a sorted, de-duplicated list.

    `name` gives each file its stored source name (default: `source_name`). Symlinks that lead
    to no file are reported in `skipped`, like every file that cannot be used."""
    files: dict[str, Path] = {}
    roots: list[str] = []
    skipped: dict[str, Skip] = {}
    for raw in paths:
        if any(ch in raw for ch in "*?["):
            matched = [Path(m) for m in glob.glob(raw, recursive=True) if os.path.isfile(m)]
            links = [skip for m in glob.glob(raw, recursive=True) if (skip := broken_link(Path(m), name))]
            if not matched and not links:
                raise FileNotFoundError(f"no files match {raw!r}; check the pattern (quote it so the shell keeps it)")
            files.update((str(m.resolve()), m) for m in matched)
            skipped.update((skip.source, skip) for skip in links)
            continue
        p = Path(raw)
        if p.is_dir():
            roots.append(name(p))
            for pattern in globs:
                for m in p.glob(pattern):
                    rel = m.relative_to(p).parts
                    # Hidden folders (.git, .venv) and dependency trees are never documentation.
                    if any(part.startswith(".") or part == "node_modules" for part in rel):
                        continue
                    if m.is_file():
                        files[str(m.resolve())] = m
                    elif skip := broken_link(m, name):
                        skipped[skip.source] = skip
        elif p.is_file():
            files[str(p.resolve())] = p
        elif skip := broken_link(p, name):
            skipped[skip.source] = skip
        else:
            raise FileNotFoundError(f"{raw!r} does not exist; give a folder, a file or a glob pattern")
    return Discovered(sorted(files.values(), key=name), roots, sorted(skipped.values(), key=lambda s: s.source))


def _front_matter(text: str) -> tuple[dict[str, Any], int, str | None]:
    m = FRONT_MATTER_RE.match(text)
    if not m:
        return {}, 0, None
    try:
        meta = yaml.safe_load(m.group(1) or "") or {}
    except yaml.YAMLError as e:
        return {}, 0, f"front matter is not valid YAML ({str(e).splitlines()[0]}); kept as text"
    if not isinstance(meta, dict):
        return {}, 0, "front matter is not a mapping; kept as text"
    # JSON-safe for Milvus' JSON field: YAML dates and the like become strings.
    return json.loads(json.dumps(meta, default=str)), m.end(), None


def load(path: Path, max_bytes: int, name: Callable[[Path], str] = source_name) -> Document | Skip:
    """Read one file, or say in one line why it cannot be used."""
    source = name(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return Skip(source, f"{size / 1e6:.3g} MB is over the {max_bytes / 1e6:.3g} MB limit; "
                                f"raise --max-file-mb or split the file")
        data = path.read_bytes()
    except OSError as e:
        return Skip(source, f"cannot read it ({e.strerror}); check permissions")
    if b"\0" in data[:8192]:
        return Skip(source, "binary file; only markdown and plain text are ingested")
    try:
        text = data.decode("utf-8-sig")  # tolerate a BOM; offsets index the decoded text
    except UnicodeDecodeError:
        return Skip(source, "not UTF-8 text; convert it (e.g. iconv -f latin1 -t utf-8) and re-run")
    if not text.strip():
        return Skip(source, "empty file")
    meta, body_start, problem = _front_matter(text)
    if problem:
        meta = {"front_matter_error": problem}
    if not text[body_start:].strip():
        return Skip(source, "only front matter, no content")
    return Document(source, text, body_start, hashlib.sha256(data).hexdigest(), meta)


def load_all(files: Sequence[Path], max_bytes: int) -> Iterator[Document | Skip]:
    for f in files:
        yield load(f, max_bytes)
