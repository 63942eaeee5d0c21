"""benchmarks/parity: the harness core on a fake official module of ours (CI cannot reach the official repos)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
PARITY = REPO / "benchmarks" / "parity"
FAKE = Path(__file__).resolve().parent / "fake_official"
ADAPTER = Path(__file__).resolve().parent / "fake_adapter.py"
sys.path.insert(0, str(PARITY))

import core  # noqa: E402


@pytest.fixture
def clone(tmp_path):
    """A fresh copy of the fake official repository (so a test may edit it)."""
    root = tmp_path / "official"
    shutil.copytree(FAKE, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _spec(seed=0):
    return dict(core.load_adapter(ADAPTER).DEFAULTS, seed=seed)


def test_git_blob_id_is_what_git_hash_object_prints(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"\x00\x01binary\nand text\n" * 50)
    want = subprocess.run(["git", "hash-object", str(f)], capture_output=True, text=True, check=True).stdout.strip()
    assert core.git_blob_id(f) == want


def test_pins_name_the_file_and_both_blob_ids(clone):
    pinned = core.load_adapter(ADAPTER).PINNED
    core.verify_pins(clone, pinned, "x/y", "abc")
    (clone / "official_model.py").write_text((clone / "official_model.py").read_text() + "# edited\n")
    with pytest.raises(core.PinError, match=r"official_model.py: git blob [0-9a-f]{40}, expected eefae799.*x/y@abc"):
        core.verify_pins(clone, pinned, "x/y", "abc")
    with pytest.raises(core.PinError, match="missing"):
        core.verify_pins(clone, {"nothere.py": "0" * 40}, "x/y", "abc")
    with pytest.raises(core.PinError, match="not a directory"):
        core.verify_pins(clone / "nope", pinned, "x/y", "abc")


def test_lfs_files_must_be_the_object_not_the_pointer(tmp_path):
    obj = b"the real vocabulary" * 10
    import hashlib

    sha = hashlib.sha256(obj).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(obj)}\n".encode()
    (tmp_path / "v.gz").write_bytes(pointer)
    pinned, lfs = {"v.gz": core.git_blob_id(tmp_path / "v.gz")}, {"v.gz": sha}
    with pytest.raises(core.PinError, match="Git LFS pointer"):
        core.verify_pins(tmp_path, pinned, "x/y", "abc", lfs)
    (tmp_path / "v.gz").write_bytes(obj)
    core.verify_pins(tmp_path, pinned, "x/y", "abc", lfs)
    (tmp_path / "v.gz").write_bytes(obj + b"!")
    with pytest.raises(core.PinError, match="expected the LFS object"):
        core.verify_pins(tmp_path, pinned, "x/y", "abc", lfs)


def test_test_images_have_several_sizes_and_a_greyscale_one(tmp_path):
    paths = core.test_images(tmp_path, seed=0)
    images = [Image.open(p) for p in paths]
    assert len({im.size for im in images}) == 3 and {im.mode for im in images} == {"RGB", "L"}
    for a, b in zip(paths, core.test_images(tmp_path / "again", seed=0)):
        assert Image.open(a).tobytes() == Image.open(b).tobytes()


def test_openai_format_clip_is_a_torchscript_archive_of_the_openai_state_dict(tmp_path, tiny_clip):
    from anorefiner.backbones import build_backbone

    path = core.openai_format_clip(tiny_clip, seed=3, out=tmp_path / "clip.pt")
    with pytest.raises(RuntimeError):  # like OpenAI's files: not a plain state dict
        torch.load(path, weights_only=True)
    state = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert {"visual.proj", "visual.positional_embedding", "text_projection", "token_embedding.weight"} <= set(state)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    plain = core.state_dict_copy(path, tmp_path / "state.pt")
    bb = build_backbone(tiny_clip, 56, pretrained=str(plain))
    assert torch.equal(bb.visual.proj.detach(), state["visual.proj"].float())
    again = torch.jit.load(str(core.openai_format_clip(tiny_clip, 3, tmp_path / "b.pt")), map_location="cpu")
    assert torch.equal(again.state_dict()["visual.proj"], state["visual.proj"])  # same seed, same weights


def test_fake_backend_passes_and_reports_choices_apart(clone, tmp_path):
    spec = _spec()
    rows, ok = core.run(ADAPTER, clone, tmp_path / "work", spec)
    assert ok and spec["shims"] == [] and len(spec["images"]) == 3
    by = {r["stage"]: r for r in rows}
    assert [r["stage"] for r in rows] == ["preprocessing", "position_embedding", "maps", "maps_antialiased"]
    assert by["preprocessing"]["abs"] == 0.0  # greyscale included: both sides read RGB
    assert by["position_embedding"]["rel"] < 1e-6 and by["maps"]["ok"]
    assert by["maps_antialiased"]["ok"] is None and by["maps_antialiased"]["abs"] > 1e-4  # reported, not failing
    assert 0 < by["maps_antialiased"]["rel"] <= by["maps_antialiased"]["range"]  # the range is <= max |x|
    text = core.format_rows("fake", rows)
    assert "project choice" in text and "FAIL" not in text


def test_a_deviation_fails_the_stage_and_the_command(clone, tmp_path, monkeypatch):
    monkeypatch.setenv("ANOREFINER_PARITY_FAKE_DEVIATION", "1")
    rows, ok = core.run(ADAPTER, clone, tmp_path / "work", _spec())
    assert not ok
    assert {r["stage"] for r in rows if r["ok"] is False} == {"position_embedding", "maps"}
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, str(PARITY / "run.py"), str(ADAPTER), "--official", str(clone),
           "--json", str(tmp_path / "rows.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "FAIL" in proc.stdout and "position_embedding" in proc.stdout
    env.pop("ANOREFINER_PARITY_FAKE_DEVIATION")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("PASS"), proc.stdout + proc.stderr[-2000:]


def test_the_command_refuses_another_commit(clone, tmp_path):
    (clone / "official_model.py").write_text("# another commit\n")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, str(PARITY / "run.py"), str(ADAPTER), "--official", str(clone)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "official_model.py: git blob" in proc.stderr


def test_official_side_errors_are_reported_with_its_output(clone, tmp_path):
    (clone / "official_model.py").unlink()
    with pytest.raises(RuntimeError, match="official side failed"):
        core.run_official(ADAPTER, clone, dict(_spec(), images=[], work=str(tmp_path)), tmp_path)


def test_shims_only_fill_what_is_missing():
    """In a fresh interpreter (the shims change sys.modules and Tensor.to): a missing module becomes a stub that
    raises when used, an installed one is untouched; .to('cuda') stays on the CPU without CUDA."""
    code = """
import sys, torch, shims
shims.stub_missing('json', 'anorefiner_no_such_module.sub')
import json, anorefiner_no_such_module.sub as sub
assert json.dumps([1]) == '[1]'
try:
    sub.anything(1)
except RuntimeError as err:
    assert 'anorefiner_no_such_module.sub.anything' in str(err)
else:
    raise AssertionError('the stub did not raise')
shims.cuda_to_cpu()
if not torch.cuda.is_available():
    assert torch.ones(2).to('cuda').device.type == 'cpu'
    assert torch.ones(2).to(torch.device('cuda'), torch.float64).dtype == torch.float64
    assert torch.ones(2).cuda().device.type == 'cpu'
print(shims.APPLIED)
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(PARITY)]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stub anorefiner_no_such_module.sub" in proc.stdout and "stub json" not in proc.stdout


WINCLIP_ADAPTER = Path(__file__).resolve().parent / "fake_winclip_adapter.py"


def test_winclip_adapter_runs_against_a_fake_anomalib(tmp_path):
    """benchmarks/parity/winclip.py's own official() and ours() on the fake anomalib and the tiny CLIP in open_clip's
    file format (the official side loads it through the download shim): every stage passes, the PIL preprocessing
    is reported apart, and the weights file is the one both sides read."""
    root = tmp_path / "site-packages"
    shutil.copytree(Path(__file__).resolve().parent / "fake_anomalib", root,
                    ignore=shutil.ignore_patterns("__pycache__"))
    spec = dict(core.load_adapter(WINCLIP_ADAPTER).DEFAULTS, seed=0)
    rows, ok = core.run(WINCLIP_ADAPTER, root, tmp_path / "work", spec)
    by = {r["stage"]: r for r in rows}
    assert ok, core.format_rows("fake winclip", rows)
    assert by["preprocessing"]["rel"] < 1e-6 and by["maps_fewshot"]["ok"] and by["scores_fewshot"]["ok"]
    assert by["maps_pil"]["ok"] is None and by["maps_pil"]["abs"] > 1e-6  # PIL's uint8 resize: reported only
    assert spec["clip_state"] == spec["clip"] and torch.load(spec["clip"], weights_only=True)["visual.proj"].ndim == 2
    assert "open_clip download -> the local weights file" in spec["shims"] and len(spec["images"]) == 5
