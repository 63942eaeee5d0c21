"""Safe, restartable extraction of tar and zip archives, with an atomic completion marker.

Every member is checked before it is written: absolute paths, ``..`` components, symbolic and
hard links, devices and FIFOs are refused with an :class:`UnsafeArchiveError` naming the member.
Tar members are then extracted with ``filter="data"`` (Python's own guard) as a second line.

Extraction happens in ``<dest>.partial-extract/``; the ``.complete`` marker (JSON holding the
archive's SHA-256) is written last inside it, and the folder is renamed onto ``<dest>``. So a
``<dest>`` with a marker is whole, and a killed run leaves only the staging folder, which the
next run deletes and redoes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable

from .. import __version__
from ..io import sha256_file, write_json_atomic
from ..log import LOG, progress

MARKER = ".complete"
# Says "this folder was made by anorefiner" even after the marker is gone (Snakemake deletes a rule's
# output, the marker, before rerunning it), so such a folder may be replaced; a user's folder may not.
OWNER = ".anorefiner-owned"


class UnsafeArchiveError(ValueError):
    """An archive member would write outside the destination or is not a plain file/folder."""


def read_marker(dest: str | Path) -> dict | None:
    """The ``.complete`` marker of ``dest`` as a dict, or None when absent or unreadable."""
    path = Path(dest) / MARKER
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(dest: str | Path, sha256: str | None = None) -> bool:
    """True when ``dest`` carries a marker (for the archive with ``sha256``, when given)."""
    marker = read_marker(dest)
    if marker is None:
        return False
    return sha256 is None or marker.get("archive_sha256") == sha256.lower()


def publish_dir(staging: Path, dest: Path, marker: dict) -> Path:
    """Write ``marker`` into ``staging`` (last), then rename ``staging`` onto ``dest``.

    An existing ``dest`` is replaced only if it is empty or was made here (marker or owner file);
    anything else raises ``FileExistsError`` rather than deleting a user's folder.
    """
    marker = {**marker, "anorefiner": __version__,
              "completed_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    (staging / OWNER).write_text("made by anorefiner; this folder may be deleted and rebuilt\n")
    write_json_atomic(staging / MARKER, marker)
    old = dest.with_name(dest.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    elif dest.exists():
        if read_marker(dest) is None and not (dest / OWNER).is_file():
            raise FileExistsError(
                f"{dest} exists, is not empty and has no {MARKER} marker, so it was not made by anorefiner; "
                f"move it away or choose another destination (the finished result is in {staging})"
            )
        LOG.info("replacing the previous contents of %s", dest)
        os.replace(dest, old)
    os.replace(staging, dest)
    if old.exists():
        shutil.rmtree(old)
    return dest


def _member_path(name: str, archive: Path, backslash_is_separator: bool) -> PurePosixPath | None:
    """The relative path a member may be written to, or :class:`UnsafeArchiveError`."""
    text = name.replace("\\", "/") if backslash_is_separator else name
    if "\x00" in text:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has a NUL byte in its name")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} contains '..'; refusing to extract")
    return PurePosixPath(*parts) if parts else None


def check_tar_member(member: tarfile.TarInfo, archive: Path) -> PurePosixPath | None:
    """Validate one tar member; return its relative path (None for the archive root itself)."""
    rel = _member_path(member.name, archive, backslash_is_separator=False)
    if member.issym() or member.islnk():
        kind = "symbolic link" if member.issym() else "hard link"
        raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a {kind} (-> {member.linkname!r}); "
                                 "links are refused")
    if not (member.isreg() or member.isdir()):
        kind = ("character device" if member.ischr() else "block device" if member.isblk()
                else "FIFO" if member.isfifo() else f"member of type {member.type!r}")
        raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a {kind}; only files and folders are extracted")
    return rel


def check_zip_member(info: zipfile.ZipInfo, archive: Path) -> PurePosixPath | None:
    """Validate one zip member (Unix mode bits in ``external_attr`` reveal links and devices)."""
    rel = _member_path(info.filename, archive, backslash_is_separator=True)
    mode = info.external_attr >> 16
    # Many writers store only permission bits (no file type); a type, when present, must be file/folder.
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "symbolic link" if stat.S_ISLNK(mode) else "special file"
        raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a {kind}; only files and folders are extracted")
    return rel


def _inside(staging: Path, rel: PurePosixPath) -> Path:
    target = staging.joinpath(*rel.parts)
    root = staging.resolve()
    if root not in target.resolve().parents and target.resolve() != root:
        raise UnsafeArchiveError(f"member {rel} resolves outside {staging}")
    return target


def _extract_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, staging: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        tar.extract(member, staging, filter="data")
        return
    # Pythons before 3.10.12/3.11.4 lack extraction filters: write the (already checked) member by hand.
    target = _inside(staging, PurePosixPath(member.name))
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tar.extractfile(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)


def _extract_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, rel: PurePosixPath, staging: Path) -> None:
    target = _inside(staging, rel)
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _extract_into(archive: Path, staging: Path) -> int:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            checked = [(info, check_zip_member(info, archive)) for info in infos]  # all before any write
            for info, rel in progress(checked, desc=f"extract {archive.name}", unit="file"):
                if rel is not None:
                    _extract_zip_member(zf, info, rel, staging)
        return len(infos)
    if not tarfile.is_tarfile(archive):
        raise ValueError(f"{archive} is neither a tar nor a zip archive")
    count = 0
    # Stream mode: one pass over a compressed multi-GB tar; each member is checked before it is written.
    with tarfile.open(archive, "r|*") as tar, progress(desc=f"extract {archive.name}", unit="file") as bar:
        for member in tar:
            if check_tar_member(member, archive) is not None:
                _extract_tar_member(tar, member, staging)
            count += 1
            bar.update(1)
    return count


def extract_archive(archive: str | Path, dest: str | Path, *, sha256: str | None = None,
                    post: Callable[[Path], None] | None = None) -> Path:
    """Extract ``archive`` into ``dest`` safely and atomically; skip when already done.

    ``sha256`` is the (already verified) archive hash recorded in the marker; it is computed when
    not given. ``post(staging)`` may rearrange the extracted tree before it is published.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist")
    sha256 = (sha256 or sha256_file(archive)).lower()
    if is_complete(dest, sha256):
        LOG.info("%s already extracted into %s (marker %s)", archive.name, dest, MARKER)
        return dest
    staging = dest.with_name(dest.name + ".partial-extract")
    if staging.exists():
        LOG.info("removing the unfinished extraction %s", staging)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    LOG.info("extracting %s into %s", archive, dest)
    try:
        members = _extract_into(archive, staging)
    except UnsafeArchiveError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if post is not None:
        post(staging)
    files = [p for p in staging.rglob("*") if p.is_file()]
    publish_dir(staging, dest, {
        "archive": archive.name, "archive_sha256": sha256, "members": members,
        "files": len(files), "bytes": sum(p.stat().st_size for p in files),
    })
    LOG.info("extracted %d files into %s", len(files), dest)
    return dest


def hoist_single_folder(staging: Path) -> None:
    """When an archive wraps everything in one top folder (a mirror's repackaging), move that
    folder's contents up. A lone folder holding ``train/`` or ``test/`` is a category and stays."""
    entries = list(staging.iterdir())
    if len(entries) != 1 or not entries[0].is_dir():
        return
    if (entries[0] / "train").is_dir() or (entries[0] / "test").is_dir():
        return
    tmp = staging.with_name(staging.name + ".hoist")
    if tmp.exists():
        shutil.rmtree(tmp)
    os.replace(entries[0], tmp)
    staging.rmdir()
    os.replace(tmp, staging)
