"""Safe extraction: hostile members are refused, interrupted runs never look complete."""

from __future__ import annotations

import hashlib
import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from anorefiner.data import extract
from anorefiner.data.extract import MARKER, OWNER, UnsafeArchiveError, extract_archive, hoist_single_folder, read_marker

GOOD = {"cat/train/good/000.png": b"a" * 100, "cat/test/good/000.png": b"b" * 50, "readme.txt": b"hello"}


def make_tar(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = (), mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def make_zip(path: Path, files: dict[str, bytes], links: dict[str, str] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for name, target in dict(links).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _tarinfo(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("suffix,mode", [(".tar.gz", "w:gz"), (".tar.xz", "w:xz"), (".tar", "w")])
def test_tar_extracts_with_marker(tmp_path, suffix, mode):
    archive = make_tar(tmp_path / f"a{suffix}", GOOD, mode=mode)
    dest = extract_archive(archive, tmp_path / "out")
    assert _files_under(dest) == set(GOOD) | {MARKER, OWNER}
    assert (dest / "cat/train/good/000.png").read_bytes() == GOOD["cat/train/good/000.png"]
    marker = read_marker(dest)
    assert marker["archive_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest() and marker["files"] == 3
    assert not (tmp_path / "out.partial-extract").exists()


def test_zip_extracts(tmp_path):
    archive = make_zip(tmp_path / "a.zip", GOOD)
    dest = extract_archive(archive, tmp_path / "out")
    assert _files_under(dest) == set(GOOD) | {MARKER, OWNER}


def test_data_filter_strips_special_permission_bits(tmp_path):
    info = tarfile.TarInfo("tool")
    info.size, info.mode = 3, 0o6777  # setuid + setgid + world-writable
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        tar.addfile(info, io.BytesIO(b"abc"))
    mode = (extract_archive(tmp_path / "a.tar", tmp_path / "out") / "tool").stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH)


@pytest.mark.parametrize("member,needle", [
    (_tarinfo("../evil.txt", tarfile.REGTYPE), "'..'"),
    (_tarinfo("cat/../../evil.txt", tarfile.REGTYPE), "'..'"),
    (_tarinfo("link", tarfile.SYMTYPE, "../../outside"), "symbolic link"),
    (_tarinfo("cat/hard", tarfile.LNKTYPE, "/etc/passwd"), "hard link"),
    (_tarinfo("cat/fifo", tarfile.FIFOTYPE), "FIFO"),
    (_tarinfo("cat/dev", tarfile.CHRTYPE), "character device"),
    (_tarinfo("cat/blk", tarfile.BLKTYPE), "block device"),
])
def test_hostile_tar_members_are_refused(tmp_path, member, needle):
    archive = make_tar(tmp_path / "bad.tar.gz", GOOD, [member])
    dest = tmp_path / "box" / "out"
    with pytest.raises(UnsafeArchiveError, match=needle) as info:
        extract_archive(archive, dest)
    assert repr(member.name) in str(info.value)
    assert not dest.exists() and not (tmp_path / "box" / "out.partial-extract").exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "box" / "evil.txt").exists()


def test_absolute_tar_member_is_refused(tmp_path):
    target = tmp_path / "abs_evil.txt"
    info = tarfile.TarInfo(str(target))
    info.size = 4
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(UnsafeArchiveError, match="absolute path"):
        extract_archive(tmp_path / "bad.tar", tmp_path / "out")
    assert not target.exists() and not (tmp_path / "out").exists()


def test_symlink_then_write_through_it_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = make_tar(tmp_path / "bad.tar", {}, [_tarinfo("cat", tarfile.SYMTYPE, str(outside))], mode="w")
    with tarfile.open(archive, "a") as tar:
        info = tarfile.TarInfo("cat/pwn.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"pwn"))
    with pytest.raises(UnsafeArchiveError, match="'cat' is a symbolic link"):
        extract_archive(archive, tmp_path / "out")
    assert not list(outside.iterdir())


@pytest.mark.parametrize("name,needle", [
    ("../evil.txt", "'..'"), ("/tmp/abs_evil_zip.txt", "absolute path"),
    ("cat\\..\\..\\evil.txt", "'..'"), ("C:/evil.txt", "absolute path"),
])
def test_hostile_zip_names_are_refused(tmp_path, name, needle):
    archive = make_zip(tmp_path / "bad.zip", {**GOOD, name: b"evil"})
    with pytest.raises(UnsafeArchiveError, match=needle):
        extract_archive(archive, tmp_path / "box" / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "box").joinpath("out").exists()
    assert not Path("/tmp/abs_evil_zip.txt").exists()


def test_zip_symlink_is_refused(tmp_path):
    archive = make_zip(tmp_path / "bad.zip", GOOD, links={"cat/link": "../../etc"})
    with pytest.raises(UnsafeArchiveError, match="'cat/link' is a symbolic link"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_killed_extraction_leaves_no_marker_and_rerun_succeeds(tmp_path, monkeypatch):
    archive = make_tar(tmp_path / "a.tar.xz", GOOD, mode="w:xz")
    dest = tmp_path / "out"
    real = extract._extract_tar_member
    calls = []

    def dies_on_second(tar, member, staging):
        calls.append(member.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(tar, member, staging)

    monkeypatch.setattr(extract, "_extract_tar_member", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        extract_archive(archive, dest)
    assert not dest.exists() and not extract.is_complete(dest)
    assert (tmp_path / "out.partial-extract" / calls[0]).is_file()  # half-done work stays in staging only
    monkeypatch.setattr(extract, "_extract_tar_member", real)
    extract_archive(archive, dest)
    assert _files_under(dest) == set(GOOD) | {MARKER, OWNER} and not (tmp_path / "out.partial-extract").exists()


def test_complete_dest_is_skipped_and_new_archive_replaces_it(tmp_path, monkeypatch):
    first = make_tar(tmp_path / "a.tar", GOOD, mode="w")
    dest = extract_archive(first, tmp_path / "out")

    def boom(*args):
        raise AssertionError("extraction should have been skipped")

    monkeypatch.setattr(extract, "_extract_tar_member", boom)
    extract_archive(first, dest)  # skipped: marker matches
    monkeypatch.undo()
    second = make_tar(tmp_path / "b.tar", {"only.txt": b"x"}, mode="w")
    extract_archive(second, dest)
    assert _files_under(dest) == {"only.txt", MARKER, OWNER}
    assert read_marker(dest)["archive"] == "b.tar" and not (tmp_path / "out.old").exists()


def test_foreign_destination_is_not_overwritten(tmp_path):
    archive = make_tar(tmp_path / "a.tar", GOOD, mode="w")
    (tmp_path / "empty").mkdir()
    extract_archive(archive, tmp_path / "empty")  # an empty folder (made by Snakemake) is fine
    (tmp_path / "empty" / MARKER).unlink()  # Snakemake removes a rule's output before a rerun
    extract_archive(archive, tmp_path / "empty")  # the owner file says the folder is ours: rebuilt
    assert extract.is_complete(tmp_path / "empty")
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not made by anorefiner"):
        extract_archive(archive, user)
    assert (user / "thesis.tex").read_text() == "precious"


def test_not_an_archive(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"this is not an archive" * 30)
    with pytest.raises(ValueError, match="neither a tar nor a zip"):
        extract_archive(tmp_path / "x.tar", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        extract_archive(tmp_path / "missing.tar", tmp_path / "out")


def test_hoist_single_folder(tmp_path):
    wrapped = tmp_path / "w"
    (wrapped / "mvtec" / "bottle" / "train").mkdir(parents=True)
    hoist_single_folder(wrapped)
    assert (wrapped / "bottle" / "train").is_dir()
    hoist_single_folder(wrapped)  # a lone category folder stays where it is
    assert (wrapped / "bottle" / "train").is_dir()
