"""Pretrained weights fetched into the local cache (backbones/weights.py) from a real HTTP server on 127.0.0.1,
verified, converted to safetensors, and read back offline."""

from __future__ import annotations

import functools
import hashlib
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

from anorefiner.backbones.weights import (
    PINNED,
    WeightSource,
    cache_path,
    fetch_weights,
    needs_fetch,
    source_for,
)
from anorefiner.data.download import ChecksumError, DownloadOptions

FAST = DownloadOptions(retries=1, backoff_s=0.0, timeout_s=10.0, chunk_bytes=4096)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def served(tmp_path):
    """A folder served over HTTP on 127.0.0.1; yields (folder, base URL)."""
    folder = tmp_path / "www"
    folder.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiny_clip_state() -> dict:
    from anorefiner.backbones.clip_vit import TINY_CLIP, ClipViT

    return ClipViT(TINY_CLIP, 56, pretrained=None, seed=3).model.state_dict()


def test_pinned_sources_carry_their_checksums():
    openai = PINNED[("ViT-L-14-336", "openai")]
    assert openai.url.split("/")[-2] == openai.sha256 and len(openai.sha256) == 64 and openai.torchscript
    laion = source_for("ViT-B-16-plus-240", "laion400m_e31")
    assert laion.url.endswith(f"-{laion.sha256}.pt")  # open_clip's registry publishes an 8-digit prefix
    assert source_for("ViT-L-14-336", "default") == openai
    assert cache_path("resnet50", "IMAGENET1K_V1") == cache_path("resnet50", "imagenet")


def test_which_pretrained_values_need_a_fetch(tmp_path):
    local = tmp_path / "mine.pt"
    local.write_bytes(b"x")
    assert needs_fetch("ViT-L-14-336", "openai") and needs_fetch("resnet50", "imagenet")
    assert not needs_fetch("ViT-L-14-336", str(local)) and not needs_fetch("ViT-L-14-336", None)
    assert not needs_fetch("efficientnet_lite0", "imagenet")  # shipped in a PyPI package
    with pytest.raises(ValueError, match="no pinned download"):
        needs_fetch("ViT-L-14-336", "laion2b_s32b_b79k")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        needs_fetch("ViT-L-14-336", str(tmp_path / "missing.pt"))


def test_state_dict_file_is_fetched_verified_and_cached(served, tmp_path):
    folder, url = served
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.float16)}
    torch.save(state, folder / "tiny-0123.pt")
    sha = _sha(folder / "tiny-0123.pt")
    out = tmp_path / "cache" / "tiny" / "tag.safetensors"
    for expected in (sha, sha[:8]):  # the full digest, or the published prefix
        out.unlink(missing_ok=True)
        assert fetch_weights(WeightSource(f"{url}/tiny-0123.pt", expected), out, FAST) == out
        got = load_file(str(out))
        assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
        assert not list(out.parent.glob("*.partial"))


def test_checksum_mismatch_leaves_no_cache_file(served, tmp_path):
    folder, url = served
    torch.save({"w": torch.zeros(2)}, folder / "w.pt")
    out = tmp_path / "cache" / "w.safetensors"
    with pytest.raises(ChecksumError, match="SHA-256 mismatch for w.pt"):
        fetch_weights(WeightSource(f"{url}/w.pt", "0" * 64), out, FAST)
    assert not out.exists() and (out.parent / "w.pt.bad-sha256").exists()


def test_a_file_you_already_have_is_verified_and_kept(tmp_path):
    src = tmp_path / "ViT-mine.pt"
    torch.save({"w": torch.ones(2)}, src)
    out = tmp_path / "cache" / "mine.safetensors"
    with pytest.raises(ChecksumError, match="left in place"):
        fetch_weights(WeightSource(str(src), "f" * 64), out)
    fetch_weights(WeightSource(str(src), _sha(src)), out)
    assert src.is_file() and torch.equal(load_file(str(out))["w"], torch.ones(2))


def test_torchscript_archive_keeps_only_its_parameters(served, tmp_path):
    """OpenAI's files are TorchScript: after the SHA-256 check only their tensors reach the cache."""
    folder, url = served
    module = torch.jit.script(torch.nn.Linear(3, 2))
    module.save(str(folder / "ts.pt"))
    out = tmp_path / "cache" / "ts.safetensors"
    fetch_weights(WeightSource(f"{url}/ts.pt", _sha(folder / "ts.pt"), torchscript=True), out, FAST)
    got = load_file(str(out))
    assert set(got) == {"weight", "bias"} and torch.equal(got["weight"], module.weight)


def test_cli_fetches_a_tiny_clip_that_then_loads_offline(served, tmp_path, monkeypatch):
    """`anorefiner fetch-weights` (rule weights) serves a compute job that builds the backbone from the cache
    alone: the same weights, with the model hub switched off."""
    from anorefiner.backbones.clip_vit import TINY_CLIP, ClipViT
    from anorefiner.cli import main as cli_main

    folder, url = served
    state = _tiny_clip_state()
    torch.save(state, folder / "tiny_clip.pt")
    out = tmp_path / "resources" / "weights" / TINY_CLIP / "mine.safetensors"
    assert cli_main(["fetch-weights", "--model", TINY_CLIP, "--pretrained", "mine", "--url", f"{url}/tiny_clip.pt",
                     "--sha256", _sha(folder / "tiny_clip.pt"), "--out", str(out), "--retries", "0"]) == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built = ClipViT(TINY_CLIP, 56, pretrained=str(out)).model.state_dict()
    assert all(torch.equal(built[k], state[k]) for k in state)
    assert ClipViT(TINY_CLIP, 56, pretrained=str(out)).weights == f"sha256:{_sha(out)}"
