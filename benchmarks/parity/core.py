"""The parity harness core: one backend against its official code on identical seeded random weights.

An *adapter* (one small module per backend, e.g. :mod:`adaclip`) names the official repository, the commit
it was written for and the git blob ids of the official files it runs (:data:`PINNED`), and provides

* ``official(root, spec) -> {stage: tensor}``: runs the official inference path from the clone at ``root``
  (called in a subprocess, :func:`child_main`, so the official imports never mix with ours);
* ``ours(spec, official) -> {stage: tensor}``: the project's own path through its official-checkpoint
  loaders, given the official side's outputs (e.g. the checkpoint the official code wrote);
* ``STAGES``: ``[(stage, description)]`` compared at the tolerance, ``CHOICES``: ``[(stage, official
  stage, description)]`` documented project choices whose effect is reported separately (never fails).

The spec holds the shared inputs: a seeded random CLIP in OpenAI's file format (:func:`openai_format_clip`;
``clip``, and ``clip_state`` the same weights as a plain state dict for ours) or, for an adapter whose official
code loads open_clip's own pretrained files (``DEFAULTS["clip_format"] = "open_clip"``, anomalib's WinCLIP), a
plain open_clip state dict that both sides read (:func:`open_clip_format_clip`),
test images of several sizes, greyscale included (:func:`test_images`), the seed and sizes. Differences are
``max |ours - official|``, that over ``max |official|`` (relative) and over the official range (max - min), per
stage; a stage passes when the relative difference is at most the tolerance (1e-4).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
TOLERANCE = 1e-4


class PinError(RuntimeError):
    """The official clone is not the pinned commit (a file is missing or has another blob id)."""


def git_blob_id(path: Path) -> str:
    """``git hash-object`` of a file: sha1 of ``b"blob <size>\\0" + content``."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def verify_pins(root: Path, pinned: dict[str, str], repo: str, commit: str, lfs: dict[str, str] | None = None) -> None:
    """Every pinned file of the clone at ``root`` has its pinned blob id, else :class:`PinError` naming it.

    ``lfs``: files the repository keeps in Git LFS (path -> sha256 of the object): the pinned blob is the
    pointer, and the checked-out file must be the object itself (``git lfs pull``), checked by its sha256.
    """
    root, lfs = Path(root), lfs or {}
    if not root.is_dir():
        raise PinError(f"--official {root}: not a directory (a clone of {repo} at {commit})")
    for rel, blob in pinned.items():
        path = root / rel
        if not path.is_file():
            raise PinError(f"{path}: missing; --official must be a clone of {repo} at {commit}")
        got = git_blob_id(path)
        if rel in lfs:
            if got == blob:
                raise PinError(f"{path}: a Git LFS pointer; fetch the object (git lfs pull), sha256 {lfs[rel]}")
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            if sha != lfs[rel]:
                raise PinError(f"{path}: sha256 {sha}, expected the LFS object {lfs[rel]} ({repo}@{commit})")
        elif got != blob:
            raise PinError(f"{path}: git blob {got}, expected {blob} ({repo}@{commit}); check out that commit")


def official_module(root: Path, rel: str, name: str):
    """An official script (e.g. ``test.py``) of the clone at ``root`` imported as module ``name``, unchanged."""
    spec = importlib.util.spec_from_file_location(name, Path(root) / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_adapter(path: Path):
    """The adapter module at ``path`` (imported by file, so tests can bring their own)."""
    path = Path(path).resolve()
    spec = importlib.util.spec_from_file_location(f"parity_adapter_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # adapters import the shared helpers next to them
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ shared inputs
def _seeded_clip_state(model: str, seed: int) -> dict:
    """The state dict of open_clip's ``model`` (the project's tiny test model included) with weights drawn by
    ``seed``."""
    sys.path.insert(0, str(SRC))
    from anorefiner._compat import import_open_clip
    from anorefiner.backbones.clip_vit import register_tiny_clip

    open_clip = import_open_clip()
    register_tiny_clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(model, pretrained=None).state_dict()


def openai_format_clip(model: str, seed: int, out: Path) -> Path:
    """A seeded random CLIP ``model`` in OpenAI's file format: a TorchScript archive whose ``state_dict()`` holds
    the OpenAI keys (open_clip's ``CLIP`` module tree) in fp16, as OpenAI's ``ViT-*.pt`` files do. The official
    loaders ``torch.jit.load`` it and rebuild their model from that state dict. :func:`state_dict_copy` writes the
    same tensors as a plain state dict, which the project loads as local weights."""
    root = torch.nn.Module()  # a module tree with one buffer per state-dict key, scripted: no code, just weights
    for key, value in _seeded_clip_state(model, seed).items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_buffer(leaf, value.detach().half())
    torch.jit.save(torch.jit.script(root), str(out))
    return Path(out)


def open_clip_format_clip(model: str, seed: int, out: Path) -> Path:
    """A seeded random CLIP ``model`` as open_clip's pretrained files hold it (``torch.save`` of the ``CLIP``
    module's state dict, fp32), the file ``open_clip.create_model(model, pretrained=<tag>)`` loads after its
    download: the official side gets it in place of the download, ours as local weights."""
    torch.save({k: v.detach().clone() for k, v in _seeded_clip_state(model, seed).items()}, out)
    return Path(out)


def state_dict_copy(archive: Path, out: Path) -> Path:
    """The state dict of an OpenAI TorchScript archive as a plain ``torch.save`` file (``weights_only`` loadable)."""
    state = torch.jit.load(str(archive), map_location="cpu").state_dict()
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI's archives carry these scalars
        state.pop(key, None)  # (build_model_from_openai_state_dict drops them too); open_clip's CLIP has none
    torch.save({k: v.detach().clone() for k, v in state.items()}, out)
    return Path(out)


def quarter_layers(model: str) -> list[int]:
    """Blocks at the quarters of the vision tower's depth (6/12/18/24 of ViT-L, 3/6/9/12 of ViT-B): the layers
    every official script taps (``--features_list``), read from open_clip's config of ``model``."""
    sys.path.insert(0, str(SRC))
    from anorefiner._compat import import_open_clip
    from anorefiner.backbones.clip_vit import default_vit_layers

    return default_vit_layers(import_open_clip().get_model_config(model)["vision_cfg"]["layers"])


def config_quarters(config_json: Path) -> tuple[list[int], dict]:
    """(the quarters of the depth, the config) from an official model-config JSON (``vision_cfg.layers``), as
    AdaCLIP's ``test.py`` derives its ``features_list``; for the official side (no project imports)."""
    cfg = json.loads(Path(config_json).read_text())
    n = cfg["vision_cfg"]["layers"] // 4
    return [n, 2 * n, 3 * n, 4 * n], cfg


def test_images(out_dir: Path, seed: int, count: int = 3) -> list[str]:
    """Smooth random test images, PNG, cycling through 300x260 RGB, 180x180 greyscale (mode L), 320x240 RGB."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    kinds = ((300, 260, "RGB"), (180, 180, "L"), (320, 240, "RGB"))
    for i in range(count):
        w, h, mode = kinds[i % len(kinds)]
        c = 3 if mode == "RGB" else 1
        small = rng.integers(0, 256, size=(h // 20, w // 20, c)).astype(np.uint8)
        img = Image.fromarray(small.squeeze(-1) if c == 1 else small, mode).resize((w, h), Image.BILINEAR)
        noise = rng.integers(-20, 21, size=(h, w, c)).squeeze(-1) if c == 1 else rng.integers(-20, 21, (h, w, c))
        arr = np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)
        path = out_dir / f"image{i}_{w}x{h}_{mode}.png"
        Image.fromarray(arr, mode).save(path)
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------ the official side (subprocess)
def run_official(adapter_path: Path, root: Path, spec: dict, work: Path, python: str = sys.executable) -> dict:
    """Run ``adapter.official(root, spec)`` in a subprocess (cwd = the clone) and load its stages."""
    spec_file, out = work / "spec.json", work / "official.pt"
    spec_file.write_text(json.dumps(spec, indent=1))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [python, str(Path(__file__).resolve()), str(Path(adapter_path).resolve()), str(Path(root).resolve()),
           str(spec_file.resolve()), str(out.resolve())]  # the child runs in the clone
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"official side failed ({' '.join(cmd)}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    stages = torch.load(out, weights_only=True)
    shims_file = out.with_suffix(".shims.json")
    stages["shims"] = json.loads(shims_file.read_text()) if shims_file.is_file() else []
    return stages


def child_main(argv: list[str]) -> int:
    """Subprocess entry: ``core.py ADAPTER ROOT SPEC OUT``."""
    adapter_path, root, spec_file, out = argv
    adapter = load_adapter(Path(adapter_path))
    sys.path.insert(0, str(Path(root).resolve()))
    spec = json.loads(Path(spec_file).read_text())
    with torch.no_grad():
        stages = adapter.official(Path(root).resolve(), spec)
    tmp = Path(f"{out}.tmp")
    torch.save({k: _plain(v) for k, v in stages.items()}, tmp)
    os.replace(tmp, out)
    applied = sys.modules["shims"].APPLIED if "shims" in sys.modules else []
    Path(out).with_suffix(".shims.json").write_text(json.dumps(applied))
    return 0


def _plain(v):
    if isinstance(v, (list, tuple)):
        return torch.stack([_plain(x) for x in v])
    return torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).detach().cpu()


# ------------------------------------------------------------------ comparison
def difference(ours, official) -> tuple[float, float, float]:
    """(max abs difference, that / max |official| (relative), that / (max - min of official) (of the range)),
    in float64. The range figure says how much of a map's contrast a difference is."""
    a = _plain(ours).double()
    b = _plain(official).double()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: ours {tuple(a.shape)}, official {tuple(b.shape)}")
    if not b.numel():
        return 0.0, 0.0, 0.0
    diff = float((a - b).abs().max())
    scale, spread = float(b.abs().max()), float(b.max() - b.min())
    return diff, diff / scale if scale > 0 else diff, diff / spread if spread > 0 else diff


def compare(adapter, ours: dict, official: dict, tol: float = TOLERANCE) -> list[dict]:
    """Rows ``{stage, description, abs, rel, range, ok}`` for ``STAGES`` (ok: rel <= tol) and ``CHOICES``
    (ok None: reported, never failing)."""
    rows = []
    for stage, desc in adapter.STAGES:
        d_abs, d_rel, d_range = difference(ours[stage], official[stage])
        rows.append({"stage": stage, "description": desc, "abs": d_abs, "rel": d_rel, "range": d_range,
                     "ok": d_rel <= tol})
    for stage, ref, desc in getattr(adapter, "CHOICES", ()):
        d_abs, d_rel, d_range = difference(ours[stage], official[ref])
        rows.append({"stage": stage, "description": desc, "abs": d_abs, "rel": d_rel, "range": d_range, "ok": None})
    return rows


def format_rows(name: str, rows: list[dict], tol: float = TOLERANCE) -> str:
    lines = [f"{name}: max abs / relative / of-range difference per stage (pass: relative <= {tol:g})",
             f"  {'stage':<28} {'max abs':>10} {'relative':>10} {'of range':>10}  result"]
    for r in rows:
        res = "project choice" if r["ok"] is None else ("pass" if r["ok"] else "FAIL")
        lines.append(f"  {r['stage']:<28} {r['abs']:>10.2e} {r['rel']:>10.2e} {r['range']:>10.2e}  {res}  "
                     f"({r['description']})")
    return "\n".join(lines)


def run(adapter_path: Path, root: Path, work: Path, spec: dict, python: str = sys.executable,
        tol: float = TOLERANCE) -> tuple[list[dict], bool]:
    """Pins, shared inputs, the official side, ours, the comparison: ``(rows, all stages passed)``. ``spec`` is
    completed in place (images, CLIP files, ``shims``: what the official side needed)."""
    adapter = load_adapter(adapter_path)
    verify_pins(root, adapter.PINNED, adapter.REPO, adapter.COMMIT, getattr(adapter, "LFS", None))
    work = Path(work).resolve()  # the official side runs in the clone: every path it reads is absolute
    work.mkdir(parents=True, exist_ok=True)
    if "images" not in spec:
        spec["images"] = test_images(work / "images", spec["seed"], spec.get("n_images", 3))
    clip_format = spec.get("clip_format", "openai")
    open_clip_file = clip_format == "open_clip"
    if spec.get("model") and "clip" not in spec:
        make = open_clip_format_clip if open_clip_file else openai_format_clip
        spec["clip"] = str(make(spec["model"], spec["seed"], work / f"{spec['model']}-{clip_format}.pt"))
    if spec.get("clip"):  # ours loads local weights as a plain state dict
        spec["clip_state"] = spec["clip"] if open_clip_file else str(
            state_dict_copy(Path(spec["clip"]), work / "clip-state-dict.pt"))
    spec["work"] = str(work)
    official = run_official(adapter_path, root, spec, work, python)
    spec["shims"] = official.pop("shims")
    ours = adapter.ours(spec, official)
    rows = compare(adapter, ours, official, tol)
    return rows, all(r["ok"] for r in rows if r["ok"] is not None)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
