"""Atomic output helpers: a reader never sees a half-written file; and the SHA-256 of a file.

Every writer in the package writes to a temporary sibling and renames it into place
(``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .log import progress


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    On any exception (including KeyboardInterrupt) the temporary file is removed and the
    destination is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    # mkstemp creates 0600 files; outputs get the usual permissions (0666 minus the umask).
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def stale_temps(path: str | os.PathLike) -> list[Path]:
    """Temporary siblings that :func:`atomic_path` left for ``path`` (``.<name>.*.tmp``), e.g. after a kill."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp") if p.is_file())


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer of ``path`` left behind; returns what was removed.

    Called when a stage starts writing ``path`` (Snakemake runs one job per output, so nothing else
    is writing it then). Feature extraction's resumable ``<path>.partial`` is not touched.
    """
    from .log import LOG

    removed = []
    for tmp in stale_temps(path):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
            LOG.info("removed %s (left by an interrupted write of %s)", tmp, Path(path).name)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv_atomic(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame as CSV atomically (no index column)."""
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20, label: str | None = None) -> str:
    """Hex SHA-256 of a file, with a progress bar (multi-GB archives take a while)."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as fh, progress(total=path.stat().st_size, unit="B", unit_scale=True,
                                         desc=f"sha256 {label or path.name}", leave=False) as bar:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()
