"""Download a dataset archive with HTTP Range resume and verify its SHA-256 before use.

Standard library only (``urllib.request``). A transfer in progress lives in ``<archive>.partial``;
a rerun asks for the rest with ``Range: bytes=N-``. Servers that answer 200 instead of 206 make
the download restart from byte 0 in the same response; 416 means the partial file is already
whole. The archive only takes its final name once its SHA-256 matched, so a file at the final
path is either verified or was put there by hand (and is verified before it is used).
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..io import sha256_file
from ..log import LOG, progress
from .sources import get_source


class AcquisitionError(RuntimeError):
    """Getting a dataset failed; the message says what to do instead."""


class DownloadError(AcquisitionError):
    """The archive could not be fetched (unreachable host, HTTP error, repeated cut transfers)."""


class ChecksumError(AcquisitionError):
    """The archive's SHA-256 differs from the expected one."""


@dataclass
class DownloadOptions:
    retries: int = 3  # extra attempts after a failure that made no progress; hosts refuse now and then
    backoff_s: float = 2.0  # first wait between attempts, doubled each time (2, 4, 8 s)
    timeout_s: float = 60.0  # per socket operation; the hosts are slow but a minute of silence is a stall
    chunk_bytes: int = 1 << 20  # read size; large enough that Python overhead is negligible
    user_agent: str = f"anorefiner/{__version__} (+urllib)"  # some hosts refuse Python's default agent


_RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_TOTAL_ONLY = re.compile(r"bytes\s+\*/(\d+)")


def verify_sha256(path: str | Path, expected: str, move_aside: bool = True, name: str | Path | None = None) -> str:
    """Check ``path`` against ``expected``; on mismatch move it to ``<name>.bad-sha256`` (kept for
    inspection; ``name`` defaults to ``path``) unless ``move_aside`` is False, and raise
    :class:`ChecksumError` with both sums."""
    path = Path(path)
    name = Path(name) if name is not None else path
    expected = _normalise_sha(expected)
    actual = sha256_file(path, label=name.name)
    if actual == expected:
        return actual
    where = f"left in place at {path}"
    if move_aside:
        bad = name.with_name(name.name + ".bad-sha256")
        os.replace(path, bad)
        where = f"moved aside to {bad}"
    raise ChecksumError(
        f"SHA-256 mismatch for {name.name}: expected {expected}, actual {actual}; the file was {where} "
        f"and nothing was extracted. Rerun to download again, or pass --sha256 {actual} if you trust this file."
    )


def _normalise_sha(value: str) -> str:
    value = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"SHA-256 {value!r} is not 64 hexadecimal digits")
    return value


def manual_route(dataset: str | None, dest: Path) -> str:
    """The sentence telling a user how to supply an archive by hand."""
    name = dataset or "<name>"
    layout = "holding dtd/images/<class>/*.jpg" if name == "dtd" else "in MVTec layout"
    return (
        f"Download it by hand and place it at {dest}, or set the config key datasets.{name}.archive "
        f"to its path (or datasets.{name}.root to an already-extracted folder {layout})."
    )


def fetch(url: str, dest: str | Path, sha256: str, options: DownloadOptions | None = None,
          dataset: str | None = None) -> Path:
    """Download ``url`` to ``dest`` (resuming ``<dest>.partial``) and verify ``sha256``.

    An existing ``dest`` is verified instead of downloaded. Raises :class:`DownloadError` naming
    the URL and the manual route, or :class:`ChecksumError`.
    """
    options = options or DownloadOptions()
    dest = Path(dest)
    sha256 = _normalise_sha(sha256)
    if dest.is_file():
        LOG.info("verifying existing archive %s", dest)
        verify_sha256(dest, sha256)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = download_partial(url, dest.with_name(dest.name + ".partial"), options, manual_route(dataset, dest))
    verify_sha256(partial, sha256, name=dest)
    os.replace(partial, dest)
    LOG.info("downloaded and verified %s", dest)
    return dest


def download_partial(url: str, partial: Path, options: DownloadOptions, hint: str) -> Path:
    """Download ``url`` into ``partial``, resuming what is there, retrying with backoff while bytes arrive.

    Raises :class:`DownloadError` naming the URL, followed by ``hint`` (what the user can do instead).
    """
    failures = 0
    while True:
        before = partial.stat().st_size if partial.exists() else 0
        try:
            if _attempt(url, partial, options):
                return partial
            raise _CutTransfer("server closed the connection before the announced end")
        except _Permanent as err:
            raise DownloadError(f"cannot download {url}: {err}. {hint}") from None
        except (_CutTransfer, urllib.error.URLError, http.client.HTTPException, OSError) as err:
            gained = (partial.stat().st_size if partial.exists() else 0) > before
            failures = 0 if gained else failures + 1
            if failures > options.retries:
                raise DownloadError(f"cannot download {url} after {failures} attempts: {_describe(err)}. {hint}") from None
            wait = 0.0 if gained else options.backoff_s * 2 ** (failures - 1)
            LOG.warning("download of %s interrupted (%s); retrying in %.1f s", url, _describe(err), wait)
            time.sleep(wait)


class _CutTransfer(Exception):
    """The body ended before its announced length (retryable)."""


class _Permanent(Exception):
    """An HTTP answer that retrying will not change (404, 403, ...)."""


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"{err.reason}"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _attempt(url: str, partial: Path, options: DownloadOptions) -> bool:
    """One request. Returns True when ``partial`` is complete, False when the body was cut short."""
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": options.user_agent, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=options.timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            return _on_416(err, partial, offset)
        if err.code in _RETRY_HTTP:
            raise
        raise _Permanent(f"HTTP {err.code} {err.reason}") from None
    with response:
        status = response.status or 200  # file:// and ftp:// mirrors have no status: whole file
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                LOG.warning("server sent an unexpected range (%s); restarting %s from byte 0",
                            response.headers.get("Content-Range"), partial.name)
                partial.unlink()
                raise _CutTransfer("unexpected Content-Range")
            total = int(match.group(3)) if match.group(3) != "*" else None
            mode = "ab"
        elif status == 200:
            if offset:
                LOG.warning("server ignored the Range request; restarting %s from byte 0", partial.name)
            offset, total, mode = 0, length, "wb"
        else:
            raise _Permanent(f"unexpected HTTP status {status}")
        expected_end = offset + length if length is not None else total
        with partial.open(mode) as fh, progress(total=total, initial=offset, unit="B", unit_scale=True,
                                                desc=partial.name.removesuffix(".partial")) as bar:
            while chunk := response.read(options.chunk_bytes):
                fh.write(chunk)
                bar.update(len(chunk))
        size = partial.stat().st_size
    return expected_end is None or size >= expected_end


def _on_416(err: urllib.error.HTTPError, partial: Path, offset: int) -> bool:
    """Range not satisfiable: the partial file is whole if the server's total equals its size."""
    match = _TOTAL_ONLY.match(err.headers.get("Content-Range", "") if err.headers else "")
    total = int(match.group(1)) if match else None
    if total is None or total == offset:
        LOG.info("server reports %s already complete (%d bytes)", partial.name, offset)
        return True
    LOG.warning("%s has %d bytes but the server's file has %s; restarting from byte 0", partial.name, offset, total)
    partial.unlink()
    raise _CutTransfer("partial file larger than the remote file")


def prepare_dataset(name: str, dest: str | Path, downloads: str | Path, *, url: str | None = None,
                    sha256: str | None = None, archive: str | Path | None = None,
                    root: str | Path | None = None, options: DownloadOptions | None = None) -> Path:
    """Make dataset ``name`` ready in ``dest`` (MVTec layout; DTD as extracted) and return ``dest``.

    The archive comes from, in order of preference: ``root`` (an already-extracted folder: an
    MVTec-layout root is validated and returned as is, a raw VisA folder is converted into
    ``dest``), ``archive`` (a local file, verified, never moved), or ``url`` (default: the official
    address; a mirror serves the same file so the official SHA-256 applies unless ``sha256`` is given).
    Downloads go to ``downloads/<archive filename>``. Reruns skip finished steps (``.complete`` markers).
    """
    from .extract import extract_archive, hoist_single_folder
    from .sources import dtd_texture_paths, validate_mvtec_root
    from .visa import convert_visa, find_visa_root

    source = get_source(name)
    dest, downloads = Path(dest), Path(downloads)
    expected = _normalise_sha(sha256 or source.sha256)
    if root is not None:
        root = Path(root)
        if source.layout == "visa" and _looks_like_raw_visa(root):
            return convert_visa(find_visa_root(root), dest)
        if source.layout == "textures":
            LOG.info("%s: %d texture images under %s", name, len(dtd_texture_paths(root)), root)
        else:
            cats = validate_mvtec_root(root)
            LOG.info("%s: using the existing folder %s (categories: %s)", name, root, ", ".join(cats))
        return root
    if archive is not None:
        archive = Path(archive)
        if not archive.is_file():
            raise FileNotFoundError(f"archive {archive} for dataset {name!r} does not exist")
        LOG.info("verifying the supplied archive %s", archive)
        verify_sha256(archive, expected, move_aside=False)
    else:
        target = downloads / source.filename
        LOG.info("%s: fetching %s (about %s) to %s", name, url or source.url, source.approx_size, target)
        LOG.info("%s is licensed %s; its terms apply to the data and to what is computed from it", name, source.licence)
        archive = fetch(url or source.url, target, expected, options, dataset=name)
    if source.layout == "visa":
        raw = dest.with_name(dest.name + ".raw")
        extract_archive(archive, raw, sha256=expected, post=hoist_single_folder)
        return convert_visa(find_visa_root(raw), dest, archive_sha256=expected)
    post = hoist_single_folder if source.layout == "mvtec" else None
    extract_archive(archive, dest, sha256=expected, post=post)
    if source.layout == "mvtec":
        cats = validate_mvtec_root(dest)
        missing = sorted(set(source.categories) - set(cats))
        if missing and expected == source.sha256:
            raise FileNotFoundError(f"{dest} lacks categories {', '.join(missing)} after extraction")
        LOG.info("%s ready at %s (categories: %s)", name, dest, ", ".join(cats))
    else:
        LOG.info("%s ready at %s (%d texture images)", name, dest, len(dtd_texture_paths(dest)))
    return dest


def _looks_like_raw_visa(root: Path) -> bool:
    return any(root.glob("split_csv/1cls.csv")) or any(root.glob("*/split_csv/1cls.csv"))

