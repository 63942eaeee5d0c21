"""The pinned Stable Diffusion download (rule sd_weights) against a local stand-in of the hub on 127.0.0.1: the tree
API's checksums are checked for every file before the folder is published."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from anorefiner.cli import main as cli_main
from anorefiner.data.download import ChecksumError, DownloadOptions
from anorefiner.seas.fetch import PINNED, HubModel, cache_dir, fetch_model
from anorefiner.zsad.checkpoints import git_blob_id

REPO, REV = "org/tiny-sd", "0123456789abcdef0123456789abcdef01234567"


def _tree(root: Path) -> dict[str, list]:
    """The hub's ``tree`` answers for every folder of ``root`` (weights as Git LFS files)."""
    out: dict[str, list] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        entry = {"type": "file", "path": rel, "size": path.stat().st_size, "oid": git_blob_id(path)}
        if path.suffix == ".safetensors":
            entry["lfs"] = {"oid": hashlib.sha256(path.read_bytes()).hexdigest(), "size": path.stat().st_size}
        out.setdefault(str(Path(rel).parent), []).append(entry)
    return out


@pytest.fixture()
def hub(tiny_sd):
    """A local hub serving the tiny model; ``hub.tamper[path] = bytes`` serves other bytes for that file."""
    tree = _tree(tiny_sd)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            api = f"/api/models/{REPO}/tree/{REV}"
            if self.path.startswith(api):
                folder = self.path[len(api):].strip("/") or "."
                body = json.dumps(tree.get(folder, [])).encode()
            elif self.path.startswith(f"/{REPO}/resolve/{REV}/"):
                rel = self.path.split(f"/resolve/{REV}/", 1)[1]
                body = self.server.tamper.get(rel) or (tiny_sd / rel).read_bytes()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.tamper = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    server.files = tuple(sorted(e["path"] for entries in tree.values() for e in entries))
    yield server
    server.shutdown()
    server.server_close()


OPTIONS = DownloadOptions(retries=0, backoff_s=0.0, timeout_s=10)


def test_fetches_verifies_and_publishes_the_pinned_files(hub, tiny_sd, tmp_path):
    from anorefiner.seas.sd import load_base

    out = fetch_model(HubModel(REPO, REV, hub.files), tmp_path / "sd" / REV, OPTIONS, endpoint=hub.endpoint)
    for rel in hub.files:
        assert (out / rel).read_bytes() == (tiny_sd / rel).read_bytes()
    record = json.loads((out / "fetch.json").read_text())
    assert record["repo"] == REPO and record["revision"] == REV and set(record["files"]) == set(hub.files)
    assert "sha256" in record["files"]["unet/diffusion_pytorch_model.safetensors"]
    assert not (tmp_path / "sd" / f"{REV}.partial").exists()
    assert load_base(out).unet is not None
    hub.shutdown()  # a published folder is kept: nothing is fetched again
    assert fetch_model(HubModel(REPO, REV, hub.files), out, OPTIONS, endpoint=hub.endpoint) == out


def test_a_file_that_differs_from_the_pinned_tree_is_refused(hub, tiny_sd, tmp_path):
    weights = "unet/diffusion_pytorch_model.safetensors"
    good = (tiny_sd / weights).read_bytes()
    hub.tamper[weights] = good[:-1] + bytes([good[-1] ^ 1])  # same size, one bit flipped
    with pytest.raises(ChecksumError, match="checksum"):
        fetch_model(HubModel(REPO, REV, hub.files), tmp_path / "out", OPTIONS, endpoint=hub.endpoint)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.partial" / f"{weights}.partial").exists()
    hub.tamper.clear()  # a rerun fetches the rest and publishes
    fetch_model(HubModel(REPO, REV, hub.files), tmp_path / "out", OPTIONS, endpoint=hub.endpoint)
    assert (tmp_path / "out" / weights).read_bytes() == good


def test_a_file_missing_at_the_revision_is_named(hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="vae/nothing.bin"):
        fetch_model(HubModel(REPO, REV, hub.files + ("vae/nothing.bin",)), tmp_path / "x", OPTIONS,
                    endpoint=hub.endpoint)


def test_fetch_weights_knows_the_pinned_stable_diffusion(tmp_path):
    sd = PINNED["stable-diffusion-v1-4"]
    assert sd.repo == "CompVis/stable-diffusion-v1-4" and len(sd.revision) == 40
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/config.json", "tokenizer/vocab.json"} <= set(sd.files)
    assert cache_dir("stable-diffusion-v1-4") == Path("resources/weights/stable-diffusion-v1-4") / sd.revision
    out = str(tmp_path / "sd")
    assert cli_main(["fetch-weights", "--model", "stable-diffusion-v1-4", "--pretrained", "main", "--out", out]) == 1
    assert cli_main(["fetch-weights", "--model", "stable-diffusion-v1-4", "--pretrained", "default", "--url", "x",
                     "--out", out]) == 1
