"""Official checkpoints: git blob ids, verified download/copy, the train-backend command's --official path."""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import threading

import pytest
import torch

from anorefiner.cli import main as cli
from anorefiner.zsad.april_gan.backend import CHECKPOINT_KEY, LinearAdapters
from anorefiner.zsad.checkpoints import OFFICIAL, fetch_checkpoint, git_blob_id


@pytest.fixture()
def ckpt(tmp_path):
    path = tmp_path / "src" / "visa_pretrained.pth"
    path.parent.mkdir()
    torch.save({CHECKPOINT_KEY: LinearAdapters(8, 4, 4).state_dict()}, path)
    return path


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_blob_id_is_what_git_prints(ckpt):
    expected = subprocess.run(["git", "hash-object", str(ckpt)], capture_output=True, text=True, check=True).stdout
    assert git_blob_id(ckpt) == expected.strip()


def test_known_official_ids_are_the_specs():
    assert OFFICIAL["april_gan"]["visa"]["git_blob"] == "86d6848c543f8393663d35c0333498ffb5ce9b68"
    assert OFFICIAL["april_gan"]["mvtec_ad"]["url"].endswith("/exps/pretrained/mvtec_pretrained.pth")


def test_local_copy_is_verified(ckpt, tmp_path):
    out = fetch_checkpoint(str(ckpt), tmp_path / "dl" / "a.pth", git_blob_id(ckpt))
    assert out.read_bytes() == ckpt.read_bytes()
    with pytest.raises(ValueError, match="does not match the expected 0000"):
        fetch_checkpoint(str(ckpt), tmp_path / "dl" / "b.pth", "0" * 40)
    assert not (tmp_path / "dl" / "b.pth").exists()


def test_http_download_is_verified(ckpt, tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ckpt.parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{ckpt.name}"
        out = fetch_checkpoint(url, tmp_path / "dl" / ckpt.name, git_blob_id(ckpt))
        assert out.read_bytes() == ckpt.read_bytes()
        with pytest.raises(ValueError, match="git blob id"):
            fetch_checkpoint(url, tmp_path / "dl2" / ckpt.name, "1" * 40)
        assert not (tmp_path / "dl2" / ckpt.name).exists()
        assert (tmp_path / "dl2" / f"{ckpt.name}.bad-git-blob").exists()
    finally:
        server.shutdown()


def test_command_checks_keys_before_writing(ckpt, tmp_path):
    out = tmp_path / "results" / "ck.pt"
    base = ["train-backend", "--backend-type", "april_gan", "--dataset", "visa", "--backbone", "ViT-B-16",
            "--resolution", "224", "--download-dir", str(tmp_path / "dl"), "--out", str(out)]
    assert cli(base + ["--official", str(ckpt), "--git-blob", git_blob_id(ckpt)]) == 0
    assert torch.load(out, weights_only=True)[CHECKPOINT_KEY]["fc.3.bias"].shape == (4,)
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": LinearAdapters(8, 4, 4).state_dict()}, wrong)
    out2 = tmp_path / "results" / "ck2.pt"
    base[-1] = str(out2)
    assert cli(base + ["--official", str(wrong), "--git-blob", git_blob_id(wrong)]) == 1  # logged error
    assert not out2.exists()


def test_drive_only_official_files_need_a_local_copy(tmp_path, tiny_clip):
    """VCP-CLIP / AdaCLIP publish no checksum: a URL is refused (nothing unverified is downloaded); a local file
    the user downloaded is accepted after its keys and shapes are checked."""
    from anorefiner.backbones import build_backbone
    from anorefiner.zsad.vcp_clip.backend import VcpDims, VcpModel

    assert OFFICIAL["vcp_clip"]["visa"]["git_blob"] is None and OFFICIAL["adaclip"]["mvtec_ad"]["git_blob"] is None
    out = tmp_path / "results" / "vcp.pt"
    base = ["train-backend", "--backend-type", "vcp_clip", "--dataset", "visa", "--backbone", tiny_clip,
            "--resolution", "56", "--pretrained", "none", "--download-dir", str(tmp_path / "dl"), "--out", str(out)]
    assert cli(base + ["--official", "default"]) == 1  # the Drive URL: refused, with the instructions logged
    assert not out.exists() and not (tmp_path / "dl").exists()
    local = tmp_path / "train_visa.pth"
    torch.save(VcpModel(VcpDims.of_backbone(build_backbone(tiny_clip, 56, pretrained=None))).state_official(), local)
    assert cli(base + ["--official", str(local)]) == 0
    assert out.read_bytes() == local.read_bytes()
    wrong = tmp_path / "wrong.pth"
    torch.save({"trainable_linearlayer": LinearAdapters(8, 4, 4).state_dict()}, wrong)
    out.unlink()
    assert cli(base + ["--official", str(wrong)]) == 1
    assert not out.exists()
