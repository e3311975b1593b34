"""Upload safety without a server: allow-list, limits, zip-slip, zip bombs, forged headers."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest

from ui.uploads import UploadLimits, safe_name, store_uploads

LIMITS = UploadLimits(max_file_bytes=10_000, max_zip_bytes=50_000, max_unzipped_bytes=30_000,
                      max_ratio=100.0, max_members=20)


def make_zip(path: Path, members: dict[str, bytes | str], **info: object) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zi = zipfile.ZipInfo(name)
            zi.compress_type = zipfile.ZIP_DEFLATED
            for k, v in info.get(name, {}).items():  # type: ignore[union-attr]
                setattr(zi, k, v)
            zf.writestr(zi, data)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "data" / "uploads" / "docs"


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_text_files_are_stored_and_others_rejected(tmp_path, dest):
    (tmp_path / "a.md").write_text("# A\n\ntext\n")
    (tmp_path / "b.TXT").write_text("plain\n")
    (tmp_path / "c.pdf").write_bytes(b"%PDF-1.7")
    (tmp_path / "d.md").write_bytes(b"\x00\x01binary")
    (tmp_path / "e.md").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "big.md").write_text("x" * 20_000)
    res = store_uploads([tmp_path / n for n in ("a.md", "b.TXT", "c.pdf", "d.md", "e.md", "big.md")], dest, LIMITS)
    assert files_under(dest) == ["a.md", "b.TXT"]
    reasons = dict(res.rejected)
    assert "not accepted" in reasons["c.pdf"]
    assert "binary" in reasons["d.md"]
    assert "not UTF-8" in reasons["e.md"]
    assert "limit per file" in reasons["big.md"]


def test_zip_members_extracted_under_a_folder_named_after_it(tmp_path, dest):
    z = make_zip(tmp_path / "handbook.zip", {
        "guide/intro.md": "# Intro\n", "guide/notes.txt": "notes\n", "guide/logo.png": b"\x89PNG",
        "__MACOSX/guide/._intro.md": b"\x00", ".hidden/secret.md": "# s\n",
    })
    res = store_uploads([z], dest, LIMITS)
    assert files_under(dest) == ["handbook/guide/intro.md", "handbook/guide/notes.txt"]
    rejected = dict(res.rejected)
    assert "not accepted" in rejected["handbook.zip:guide/logo.png"]
    assert "macOS" in rejected["handbook.zip:__MACOSX/guide/._intro.md"]
    assert "hidden" in rejected["handbook.zip:.hidden/secret.md"]


@pytest.mark.parametrize("evil", ["../escape.md", "a/../../escape.md", "/etc/escape.md", "C:/escape.md",
                                  "..\\escape.md"])
def test_zip_slip_refuses_the_whole_archive(tmp_path, dest, evil):
    z = make_zip(tmp_path / "slip.zip", {"ok.md": "# ok\n", evil: "# evil\n"})
    res = store_uploads([z], dest, LIMITS)
    assert res.saved == [] and len(res.rejected) == 1
    assert "nothing was extracted" in res.rejected[0][1]
    assert files_under(tmp_path) == ["slip.zip"]  # not even the harmless member, and no staging left


def test_symlink_member_refused(tmp_path, dest):
    z = make_zip(tmp_path / "link.zip", {"link.md": "/etc/passwd"},
                 **{"link.md": {"external_attr": (stat.S_IFLNK | 0o777) << 16}})
    res = store_uploads([z], dest, LIMITS)
    assert res.saved == [] and "symbolic link" in res.rejected[0][1]


def test_zip_bomb_and_size_limits(tmp_path, dest):
    bomb = make_zip(tmp_path / "bomb.zip", {"zeros.md": "0" * 2_000_000})
    res = store_uploads([bomb], dest, LIMITS)
    assert res.saved == [] and "zip bomb" in res.rejected[0][1]

    many = make_zip(tmp_path / "many.zip", {f"f{i}.md": f"# {i}\n" for i in range(25)})
    assert "over the limit of 20" in store_uploads([many], dest, LIMITS).rejected[0][1]

    total = make_zip(tmp_path / "total.zip", {f"f{i}.md": "word " * 1800 for i in range(5)})
    assert "when unpacked" in store_uploads([total], dest, LIMITS).rejected[0][1]

    heavy = tmp_path / "heavy.zip"
    heavy.write_bytes(b"PK" + b"\0" * 60_000)
    assert "limit per upload" in store_uploads([heavy], dest, LIMITS).rejected[0][1]
    assert files_under(dest) == []


def test_forged_member_size_is_caught_while_extracting(tmp_path, dest):
    z = make_zip(tmp_path / "forged.zip", {"a.md": "# A\n" + "word " * 1000})
    data = bytearray(z.read_bytes())
    # Shrink the declared size in the central directory (what infolist() reads) to 10 bytes.
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = (10).to_bytes(4, "little")
    z.write_bytes(bytes(data))
    res = store_uploads([z], dest, LIMITS)
    assert res.saved == []
    assert any(w in res.rejected[0][1] for w in ("larger than its header", "cannot read the archive"))
    assert files_under(dest) == []


def test_not_a_zip_and_unsafe_names(tmp_path, dest):
    fake = tmp_path / "fake.zip"
    fake.write_text("not a zip")
    (tmp_path / "..md").write_text("x")
    res = store_uploads([fake, tmp_path / "..md"], dest, LIMITS)
    assert dict(res.rejected)["fake.zip"] == "not a valid .zip archive"
    assert "no usable characters" in dict(res.rejected)["..md"]


def test_safe_name():
    assert safe_name("../../etc/passwd") == "_.._etc_passwd"
    assert safe_name(".bashrc") == "bashrc"
    assert safe_name("Notes (v2).md") == "Notes _v2_.md"
    assert safe_name("résumé.md") == "résumé.md"
