"""End-to-end acquisition against a real HTTP server on 127.0.0.1 (Range, cuts, 404, ignored Range)."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from anorefiner.data.download import (
    ChecksumError,
    DownloadError,
    DownloadOptions,
    fetch,
    prepare_dataset,
)
from anorefiner.data.extract import MARKER, read_marker
from anorefiner.data.sources import SOURCES, dtd_texture_paths, get_source, validate_mvtec_root

FAST = DownloadOptions(retries=2, backoff_s=0.0, timeout_s=10.0, chunk_bytes=4096)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        srv = self.server
        srv.requests.append(dict(self.headers))
        body = srv.files.get(self.path)
        if srv.fail_next > 0 and srv.cuts_left == 0:  # failures come after any scripted cuts
            srv.fail_next -= 1
            srv.statuses.append(503)  # recorded before responding: the client may assert right after
            self.send_error(503)
            return
        if body is None or srv.not_found:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                srv.statuses.append(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            srv.statuses.append(206)
        else:
            self.send_response(200)
            srv.statuses.append(200)
        part = body[start:]
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if srv.cuts_left > 0:  # announce the full length, send K bytes, hang up
            srv.cuts_left -= 1
            self.wfile.write(part[: srv.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(part)


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.statuses = {}, [], []
    httpd.not_found = httpd.ignore_range = False
    httpd.cuts_left, httpd.cut_after, httpd.fail_next = 0, 0, 0
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def mvtec_archive() -> bytes:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=20000, dtype=np.uint8).tobytes()  # incompressible: many chunks
    files = {"widget/train/good/000.png": _png(10), "widget/train/good/001.png": _png(11),
             "widget/test/good/000.png": _png(20), "widget/test/crack/000.png": _png(30),
             "widget/ground_truth/crack/000_mask.png": _png(255), "license.txt": noise}
    return _tar(files, "w:xz")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_sources_table():
    assert len(get_source("mvtec_ad").categories) == 15 and len(get_source("visa").categories) == 12
    assert SOURCES["dtd"].sha256.startswith("e42855a5") and "38536" not in SOURCES["mvtec_ad"].url
    assert [SOURCES[n].licence.split(" (")[0] for n in ("mvtec_ad", "visa", "dtd")] == [
        "CC BY-NC-SA 4.0", "CC BY 4.0", "research use only"]
    with pytest.raises(ValueError, match="unknown dataset 'mvtec'"):
        get_source("mvtec")


def test_full_download_verify_extract(server, tmp_path, caplog):
    data = mvtec_archive()
    server.files["/m.tar.xz"] = data
    dest = tmp_path / "datasets" / "mvtec_ad"
    with caplog.at_level("INFO", logger="anorefiner"):
        out = prepare_dataset("mvtec_ad", dest, tmp_path / "downloads", url=server.base + "/m.tar.xz",
                              sha256=_sha(data), options=FAST)
    assert "mvtec_ad is licensed CC BY-NC-SA 4.0" in caplog.text
    assert out == dest and validate_mvtec_root(dest) == ["widget"]
    assert (dest / "widget" / "ground_truth" / "crack" / "000_mask.png").read_bytes() == _png(255)
    assert read_marker(dest)["archive_sha256"] == _sha(data)
    archive = tmp_path / "downloads" / SOURCES["mvtec_ad"].filename
    assert archive.read_bytes() == data and not archive.with_name(archive.name + ".partial").exists()
    assert "anorefiner/" in server.requests[0]["User-Agent"]
    # A rerun verifies the archive on disk and skips extraction: no new request.
    prepare_dataset("mvtec_ad", dest, tmp_path / "downloads", url=server.base + "/m.tar.xz",
                    sha256=_sha(data), options=FAST)
    assert len(server.requests) == 1


def test_resume_after_cut_transfer_in_same_call(server, tmp_path):
    data = mvtec_archive()
    server.files["/a"] = data
    server.cuts_left, server.cut_after = 1, 5000
    target = fetch(server.base + "/a", tmp_path / "a.tar.xz", _sha(data), FAST)
    assert len(server.requests) == 2
    assert "Range" not in server.requests[0] and server.requests[1]["Range"] == "bytes=5000-"
    assert server.statuses == [200, 206] and _sha(target.read_bytes()) == _sha(data)


def test_resume_across_runs_after_interruption(server, tmp_path):
    """Run 1: the transfer is cut, then the host fails (503) and retries run out. Run 2 resumes."""
    data = mvtec_archive()
    server.files["/a"] = data
    server.cuts_left, server.cut_after, server.fail_next = 1, 3000, 1
    no_retry = DownloadOptions(retries=0, backoff_s=0.0, timeout_s=10.0)
    partial = tmp_path / "a.tar.xz.partial"
    with pytest.raises(DownloadError, match="HTTP 503"):
        fetch(server.base + "/a", tmp_path / "a.tar.xz", _sha(data), no_retry)
    assert partial.read_bytes() == data[:3000] and not (tmp_path / "a.tar.xz").exists()
    target = fetch(server.base + "/a", tmp_path / "a.tar.xz", _sha(data), no_retry)
    assert server.requests[-1]["Range"] == "bytes=3000-" and server.statuses[-1] == 206
    assert _sha(target.read_bytes()) == _sha(data) and not partial.exists()


def test_progress_resets_retry_budget(server, tmp_path):
    """A host that hangs up every few KB still delivers the file: each cut made progress."""
    data = mvtec_archive()
    server.files["/a"] = data
    server.cuts_left, server.cut_after = 1000, 7000
    no_retry = DownloadOptions(retries=0, backoff_s=0.0, timeout_s=10.0)
    target = fetch(server.base + "/a", tmp_path / "a.tar.xz", _sha(data), no_retry)
    assert target.read_bytes() == data
    assert len(server.requests) == -(-len(data) // 7000)
    assert all(r["Range"] == f"bytes={7000 * i}-" for i, r in enumerate(server.requests[1:], start=1))


def test_rerun_resumes_existing_partial(server, tmp_path):
    data = mvtec_archive()
    server.files["/a"] = data
    (tmp_path / "a.tar.xz.partial").write_bytes(data[:4321])  # left by a killed run
    target = fetch(server.base + "/a", tmp_path / "a.tar.xz", _sha(data), FAST)
    assert server.requests[0]["Range"] == "bytes=4321-" and server.statuses == [206]
    assert _sha(target.read_bytes()) == _sha(data)


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    data = mvtec_archive()
    server.files["/a"] = data
    server.ignore_range = True
    (tmp_path / "a.tar.xz.partial").write_bytes(b"garbage" * 100)  # appended, this would break the hash
    target = fetch(server.base + "/a", tmp_path / "a.tar.xz", _sha(data), FAST)
    assert "Range" in server.requests[0] and server.statuses == [200]
    assert target.read_bytes() == data


def test_416_means_partial_already_complete(server, tmp_path):
    data = mvtec_archive()
    server.files["/a"] = data
    (tmp_path / "a.tar.xz.partial").write_bytes(data)
    target = fetch(server.base + "/a", tmp_path / "a.tar.xz", _sha(data), FAST)
    assert server.statuses == [416] and target.read_bytes() == data


def test_checksum_mismatch_keeps_file_aside_and_extracts_nothing(server, tmp_path):
    data = mvtec_archive()
    server.files["/m.tar.xz"] = data
    wrong = "0" * 64
    dest, downloads = tmp_path / "datasets" / "mvtec_ad", tmp_path / "downloads"
    with pytest.raises(ChecksumError) as info:
        prepare_dataset("mvtec_ad", dest, downloads, url=server.base + "/m.tar.xz", sha256=wrong, options=FAST)
    assert wrong in str(info.value) and _sha(data) in str(info.value)
    name = SOURCES["mvtec_ad"].filename
    assert (downloads / f"{name}.bad-sha256").read_bytes() == data
    assert not (downloads / name).exists() and not (downloads / f"{name}.partial").exists()
    assert not dest.exists() and not list(tmp_path.glob("datasets/*"))


def test_unreachable_host_names_url_and_manual_route(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/mvtec.tar.xz"
    with pytest.raises(DownloadError) as info:
        prepare_dataset("mvtec_ad", tmp_path / "d", tmp_path / "dl", url=url, options=FAST)
    msg = str(info.value)
    assert url in msg and "datasets.mvtec_ad.archive" in msg and "datasets.mvtec_ad.root" in msg
    assert str(tmp_path / "dl" / SOURCES["mvtec_ad"].filename) in msg and "3 attempts" in msg


def test_404_is_not_retried_and_names_url(server, tmp_path):
    url = server.base + "/missing.tar"
    with pytest.raises(DownloadError) as info:
        prepare_dataset("visa", tmp_path / "d", tmp_path / "dl", url=url, options=FAST)
    msg = str(info.value)
    assert "HTTP 404" in msg and url in msg and "datasets.visa.archive" in msg
    assert str(tmp_path / "dl" / "VisA_20220922.tar") in msg
    assert len(server.requests) == 1


def test_local_archive_and_hand_placed_archive(tmp_path):
    data = mvtec_archive()
    local = tmp_path / "mine.tar.xz"
    local.write_bytes(data)
    out = prepare_dataset("mvtec_ad", tmp_path / "a", tmp_path / "dl", archive=local, sha256=_sha(data))
    assert validate_mvtec_root(out) == ["widget"]
    # An archive placed by hand under downloads/<filename> is used without any network access
    # (the URL points at a closed port, so a request would fail).
    placed = tmp_path / "dl2" / SOURCES["mvtec_ad"].filename
    placed.parent.mkdir()
    placed.write_bytes(data)
    prepare_dataset("mvtec_ad", tmp_path / "b", tmp_path / "dl2", url="http://127.0.0.1:9/x",
                    sha256=_sha(data), options=FAST)
    assert (tmp_path / "b" / MARKER).is_file()
    with pytest.raises(ChecksumError, match="left in place"):
        prepare_dataset("mvtec_ad", tmp_path / "c", tmp_path / "dl", archive=local, sha256="1" * 64)
    assert local.is_file()
    # A corrupt hand-placed archive is moved aside (kept) and nothing is extracted.
    placed.write_bytes(data[:-10])
    with pytest.raises(ChecksumError, match="moved aside"):
        prepare_dataset("mvtec_ad", tmp_path / "c", tmp_path / "dl2", sha256=_sha(data), options=FAST)
    assert placed.with_name(placed.name + ".bad-sha256").read_bytes() == data[:-10]
    assert not placed.exists() and not (tmp_path / "c").exists()


def test_file_url_mirror(tmp_path):
    data = mvtec_archive()
    (tmp_path / "mirror.tar.xz").write_bytes(data)
    url = (tmp_path / "mirror.tar.xz").as_uri()
    out = prepare_dataset("mvtec_ad", tmp_path / "d", tmp_path / "dl", url=url, sha256=_sha(data), options=FAST)
    assert validate_mvtec_root(out) == ["widget"]


def test_existing_root_validation_names_what_is_missing(tmp_path):
    root = tmp_path / "mv"
    for rel in ("widget/train/good/0.png", "widget/test/good/0.png", "widget/test/crack/0.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(1))
    with pytest.raises(FileNotFoundError, match=r"ground_truth/crack/0_mask\.png"):
        prepare_dataset("mvtec_ad", tmp_path / "x", tmp_path / "dl", root=root)
    with pytest.raises(FileNotFoundError, match=r"bottle/ \(category folder\)"):
        validate_mvtec_root(root, categories=["widget", "bottle"])
    (root / "widget/ground_truth/crack").mkdir(parents=True)
    (root / "widget/ground_truth/crack/0_mask.png").write_bytes(_png(255))
    assert prepare_dataset("mvtec_ad", tmp_path / "x", tmp_path / "dl", root=root) == root


def test_dtd_download_and_texture_paths(server, tmp_path):
    files = {f"dtd/images/{c}/{c}_000{i}.jpg": _png(i) for c in ("banded", "dotted") for i in range(2)}
    files["dtd/labels/train1.txt"] = b"banded/banded_0000.jpg\n"
    data = _tar(files, "w:gz")
    server.files["/dtd.tar.gz"] = data
    dest = prepare_dataset("dtd", tmp_path / "dtd", tmp_path / "dl", url=server.base + "/dtd.tar.gz",
                           sha256=_sha(data), options=FAST)
    paths = dtd_texture_paths(dest)
    assert [p.relative_to(dest / "dtd" / "images").as_posix() for p in paths] == sorted(
        k.removeprefix("dtd/images/") for k in files if k.endswith(".jpg"))
    with pytest.raises(FileNotFoundError, match="no DTD images"):
        dtd_texture_paths(tmp_path / "dl")


def test_cli_download(server, tmp_path):
    from anorefiner.cli import main

    data = mvtec_archive()
    server.files["/m.tar.xz"] = data
    dest = tmp_path / "out"
    argv = ["download", "--dataset", "mvtec_ad", "--dest", str(dest), "--downloads", str(tmp_path / "dl"),
            "--url", server.base + "/m.tar.xz", "--sha256", _sha(data), "--retries", "0", "--backoff", "0"]
    assert main(argv + ["--archive", "", "--root", ""]) == 0 and (dest / MARKER).is_file()  # as the workflow calls it
    server.not_found = True
    argv[argv.index(str(dest))] = str(tmp_path / "out2")
    argv[argv.index(str(tmp_path / "dl"))] = str(tmp_path / "dl2")
    assert main(argv) == 1
    local = tmp_path / "dl" / SOURCES["mvtec_ad"].filename  # --archive wins over the (failing) --url
    assert main(argv + ["--archive", str(local)]) == 0 and (tmp_path / "out2" / MARKER).is_file()
