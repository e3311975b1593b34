"""Accept uploaded documents safely: allow-listed types, size limits, and no path tricks.

Browsers and API clients can send anything, so nothing from an upload is trusted: file names
are reduced to a safe alphabet, archives are checked member by member before a byte is
written, and every file lands under one uploads folder. Whatever is refused is reported with
one line that says why; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import tempfile
import unicodedata
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from ingest.loader import TEXT_SUFFIXES

UPLOADS_PREFIX = "uploads/"  # source names of uploaded files: uploads/<path inside the collection's folder>
ZIP_SUFFIX = ".zip"
ALLOWED = ", ".join(sorted(TEXT_SUFFIXES)) + ", or a .zip of them"
_UNSAFE_CHARS = re.compile(r"[^\w.\- ]+")
_READ_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True)
class UploadLimits:
    max_file_bytes: int  # one text file, uploaded or inside a zip
    max_zip_bytes: int  # the zip as uploaded
    max_unzipped_bytes: int  # all members of one zip together
    max_ratio: float  # uncompressed / compressed size of one member
    max_members: int


@dataclasses.dataclass
class UploadResult:
    saved: list[Path] = dataclasses.field(default_factory=list)
    rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, reason)


class _Refused(Exception):
    """The whole archive is refused; the message says why."""


def upload_source_namer(root: Path) -> Callable[[Path], str]:
    """Source names for files stored under `root` (one collection's uploads folder):
    `uploads/<relative path>`, the same whichever folder rag-ui was started from."""
    base = root.resolve()

    def name(path: Path) -> str:
        return UPLOADS_PREFIX + path.resolve().relative_to(base).as_posix()

    return name


def uploaded_file(root: Path, source: str) -> Path | None:
    """The stored file behind an upload's source name, or None (not an upload, or gone)."""
    if not source.startswith(UPLOADS_PREFIX):
        return None
    path = root / source[len(UPLOADS_PREFIX):]
    inside = path.resolve().is_relative_to(root.resolve())  # a crafted name must not reach outside
    return path if inside and path.is_file() else None


def safe_name(name: str) -> str:
    """One path component in a safe alphabet, or "" when nothing usable is left."""
    name = unicodedata.normalize("NFC", name).strip()
    name = _UNSAFE_CHARS.sub("_", name)
    return name.lstrip(". ")  # no hidden files, no "..", no leading blanks


def _is_text(data: bytes) -> str | None:
    """None when `data` is UTF-8 text, else the reason it is not (same rules as the loader)."""
    if b"\0" in data[:8192]:
        return "binary file; only markdown and plain text are ingested"
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return "not UTF-8 text; convert it (e.g. iconv -f latin1 -t utf-8) and upload again"
    return None


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def store_uploads(paths: Sequence[str | os.PathLike[str]], dest: Path, limits: UploadLimits) -> UploadResult:
    """Copy uploaded files (and the text files inside uploaded zips) under `dest`.

    `paths` are the server-side temporary files; their base names are the names the user gave.
    A re-upload with the same name replaces the earlier file, so ingest sees it as changed.
    """
    dest.mkdir(parents=True, exist_ok=True)
    result = UploadResult()
    for raw in paths:
        path = Path(raw)
        shown = path.name
        suffix = path.suffix.lower()
        try:
            size = path.stat().st_size
        except OSError as e:
            result.rejected.append((shown, f"cannot read the upload ({e.strerror})"))
            continue
        if suffix == ZIP_SUFFIX:
            _store_zip(path, dest, limits, result)
        elif suffix in TEXT_SUFFIXES:
            name = safe_name(path.name)
            if Path(name).suffix.lower() not in TEXT_SUFFIXES:
                result.rejected.append((shown, "file name has no usable characters; rename it"))
            elif size > limits.max_file_bytes:
                result.rejected.append((shown, f"{_mb(size)} is over the {_mb(limits.max_file_bytes)} limit per file"))
            elif reason := _is_text(path.read_bytes()):
                result.rejected.append((shown, reason))
            else:
                target = dest / name  # safe_name leaves no separators, so this stays inside dest
                shutil.copyfile(path, target)
                result.saved.append(target)
        else:
            result.rejected.append((shown, f"type {suffix or '(none)'} is not accepted; upload {ALLOWED}"))
    return result


def _inside(root: Path, *parts: str) -> Path:
    """`root/parts...`, refusing anything that would resolve outside `root` (belt and braces)."""
    target = root.joinpath(*parts)
    if not target.resolve().is_relative_to(root.resolve()):
        raise _Refused(f"path {'/'.join(parts)!r} escapes the uploads folder")
    return target


def _member_parts(name: str) -> list[str]:
    """The path components of a zip member, or _Refused for absolute or traversing paths."""
    posix = name.replace("\\", "/")  # Windows-made archives may use backslashes
    p = PurePosixPath(posix)
    if p.is_absolute() or re.match(r"^[A-Za-z]:", posix):
        raise _Refused(f"member {name!r} has an absolute path (zip-slip); nothing was extracted")
    if ".." in p.parts:
        raise _Refused(f"member {name!r} points outside the archive with '..' (zip-slip); nothing was extracted")
    return [part for part in p.parts if part not in ("", ".")]


def _store_zip(path: Path, dest: Path, limits: UploadLimits, result: UploadResult) -> None:
    shown = path.name
    size = path.stat().st_size
    if size > limits.max_zip_bytes:
        result.rejected.append((shown, f"{_mb(size)} is over the {_mb(limits.max_zip_bytes)} limit per upload"))
        return
    if not zipfile.is_zipfile(path):
        result.rejected.append((shown, "not a valid .zip archive"))
        return
    folder = safe_name(path.stem) or "archive"
    # Extract into a private staging folder first: a refusal half-way leaves nothing behind.
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=dest))
    try:
        with zipfile.ZipFile(path) as zf:
            plan = _plan_zip(zf, limits, shown, result)
            staged: list[tuple[Path, list[str]]] = []
            for info, parts in plan:
                target = _inside(staging, *parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                _extract_bounded(zf, info, target, limits)
                reason = _is_text(target.read_bytes())
                if reason:
                    result.rejected.append((f"{shown}:{info.filename}", reason))
                    target.unlink()
                    continue
                staged.append((target, parts))
        for staged_path, parts in staged:
            final = _inside(dest, folder, *parts)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged_path, final)
            result.saved.append(final)
    except _Refused as e:
        result.rejected.append((shown, str(e)))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, OSError) as e:
        result.rejected.append((shown, f"cannot read the archive ({e})"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _plan_zip(
    zf: zipfile.ZipFile, limits: UploadLimits, shown: str, result: UploadResult,
) -> list[tuple[zipfile.ZipInfo, list[str]]]:
    """Check every member before extracting any: the archive as a whole passes or is refused."""
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise _Refused(f"{len(infos)} members is over the limit of {limits.max_members}")
    plan: list[tuple[zipfile.ZipInfo, list[str]]] = []
    total = 0
    for info in infos:
        parts = _member_parts(info.filename)  # checked for directories too: they can carry ../
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise _Refused(f"member {info.filename!r} is a symbolic link; nothing was extracted")
        if info.is_dir() or not parts:
            continue
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > 1_000_000 and ratio > limits.max_ratio:
            raise _Refused(f"member {info.filename!r} expands {ratio:.0f}x (zip bomb?); nothing was extracted")
        total += info.file_size
        if total > limits.max_unzipped_bytes:
            raise _Refused(f"contents are over the {_mb(limits.max_unzipped_bytes)} limit when unpacked")
        where = f"{shown}:{info.filename}"
        if parts[0] == "__MACOSX" or parts[-1] == ".DS_Store":
            result.rejected.append((where, "macOS metadata, not a document"))
        elif any(p.startswith(".") for p in parts):
            result.rejected.append((where, "hidden file or folder; not ingested"))
        elif PurePosixPath(parts[-1]).suffix.lower() not in TEXT_SUFFIXES:
            result.rejected.append((where, f"type {PurePosixPath(parts[-1]).suffix or '(none)'} is not accepted"))
        elif info.flag_bits & 0x1:
            result.rejected.append((where, "encrypted; upload it unencrypted"))
        elif info.file_size > limits.max_file_bytes:
            result.rejected.append((where, f"{_mb(info.file_size)} is over the {_mb(limits.max_file_bytes)} limit per file"))
        else:
            clean = [safe_name(p) for p in parts]
            if not all(clean):
                result.rejected.append((where, "name has no usable characters; rename it"))
                continue
            plan.append((info, clean))
    return plan


def _extract_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, limits: UploadLimits) -> None:
    """Copy one member, counting real bytes: a forged header size must not beat the limits."""
    cap = min(limits.max_file_bytes, info.file_size)
    written = 0
    with zf.open(info) as src, open(target, "wb") as out:
        while chunk := src.read(_READ_CHUNK):
            written += len(chunk)
            if written > cap:
                raise _Refused(f"member {info.filename!r} is larger than its header says; nothing was extracted")
            out.write(chunk)
