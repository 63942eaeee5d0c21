"""What made a result: code, packages, device and weights, recorded by each stage when it writes (docs/audit.md).

One record per written store or checkpoint (:func:`run_record`): the project's version and git commit with a
dirty flag (``"unknown"`` and the reason when the package does not run from a git checkout, e.g. an installed
wheel or sdist), the package versions, the device (CPU model; GPU model when the stage ran on CUDA), the time,
and the SHA-256 of the stage's recorded settings. :func:`weight_source` says which weights a coarse map came
from: a pretrained backbone, random weights (not meaningful), a checkpoint the pipeline trained (its commit,
auxiliary dataset and epochs) or an official file (git blob id and SHA-256). The metrics stage copies these
records from the store it scores into ``<metrics csv stem>.provenance.json`` (:func:`write_metrics_provenance`);
the tables collect them from there (:mod:`anorefiner.tables.provenance`), they never recompute them.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

UNKNOWN = "unknown"
RANDOM_WEIGHTS = "random weights — not meaningful"
# Packages whose version can change a number (recorded when installed; "absent" otherwise).
PACKAGES = ("numpy", "scipy", "pandas", "h5py", "scikit-learn", "scikit-image", "pillow", "torch", "torchvision",
            "open_clip_torch", "timm")


def versions_of(packages) -> dict[str, str]:
    """Installed versions of ``packages`` (distribution names) without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def package_versions() -> dict[str, str]:
    from . import __version__

    return {"anorefiner": __version__, "python": platform.python_version(), **versions_of(PACKAGES)}


def _git(*args: str) -> subprocess.CompletedProcess:
    here = Path(__file__).resolve().parent
    return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=30)


@lru_cache(maxsize=1)
def code_version() -> dict:
    """``{version, commit, dirty}`` of the code running now; ``commit`` is 40 hex digits or ``"unknown"``
    (then ``reason`` says why and ``dirty`` is None). ``dirty``: a tracked file differs from the commit
    (untracked files, e.g. results/ of a run inside the checkout, do not count)."""
    from . import __version__

    def unknown(reason: str) -> dict:
        return {"version": __version__, "commit": UNKNOWN, "dirty": None, "reason": reason}

    try:
        head = _git("rev-parse", "HEAD")
        if head.returncode != 0:
            return unknown(f"not run from a git checkout ({head.stderr.strip() or 'git rev-parse failed'})")
        tracked = _git("ls-files", "--error-unmatch", "__init__.py")
        if tracked.returncode != 0:
            return unknown("the package is not tracked by the git repository around it (an installed copy)")
        status = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError) as err:
        return unknown(f"git is not available ({err})")
    return {"version": __version__, "commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def code_label(code: dict | None) -> str:
    """``<commit>`` / ``<commit>+dirty`` / ``unknown (<reason>)``: one string per code state."""
    if not code:
        return f"{UNKNOWN} (not recorded)"
    if code.get("commit", UNKNOWN) == UNKNOWN:
        return f"{UNKNOWN} ({code.get('reason', 'no reason recorded')})"
    return code["commit"] + ("+dirty" if code.get("dirty") else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or UNKNOWN


def device_info(device=None) -> dict:
    """The CPU model, and the GPU model when ``device`` is (or ``"auto"`` resolves to) CUDA."""
    out = {"requested": None if device is None else str(device), "cpu": _cpu_model(), "gpu": None}
    torch = sys.modules.get("torch")  # a stage that never imported torch never ran on a GPU
    text = str(device or "auto")
    if torch is not None and (text == "auto" or text.startswith("cuda")) and torch.cuda.is_available():
        index = torch.device(text).index if text.startswith("cuda") else None
        out["gpu"] = torch.cuda.get_device_name(index if index is not None else torch.cuda.current_device())
    return out


def device_label(info: dict | None) -> str:
    if not info:
        return f"{UNKNOWN} (not recorded)"
    return f"GPU {info['gpu']}" if info.get("gpu") else f"CPU {info.get('cpu', UNKNOWN)}"


def settings_sha256(settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def run_record(device=None, settings=None) -> dict:
    """What a stage records beside its output (store attribute / checkpoint meta ``run``)."""
    record = {"code": code_version(), "versions": package_versions(), "device": device_info(device),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if settings is not None:
        record["settings_sha256"] = settings_sha256(settings)
    return record


# ------------------------------------------------------------------------------------ weights
def checkpoint_source(path) -> dict:
    """A trained backend's checkpoint: trained by the pipeline (its ``meta``: commit, auxiliary dataset,
    epochs) or an official file (no ``meta``; named when its git blob id is a known official one)."""
    from .io import sha256_file
    from .zsad.checkpoints import OFFICIAL, git_blob_id, load_weights_only

    path = Path(path)
    info = {"path": str(path), "sha256": sha256_file(path), "git_blob": git_blob_id(path)}
    obj = load_weights_only(path, "checkpoint")
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if isinstance(meta, dict) and "epoch_losses" in meta:
        run = meta.get("run")
        run = json.loads(run) if isinstance(run, str) else run
        backbone = meta.get("backbone")
        backbone = json.loads(backbone) if isinstance(backbone, str) else backbone or {}
        info.update(kind="trained", auxiliary_dataset=meta.get("auxiliary_dataset"),
                    epochs=len(meta["epoch_losses"]), code=(run or {}).get("code"),
                    backbone_weights=backbone.get("weights"))
        return info
    info["kind"] = "official"
    for backend_type, by_aux in OFFICIAL.items():
        for aux, src in by_aux.items():
            if src.get("git_blob") == info["git_blob"]:
                info["official"] = f"{backend_type} trained on {aux}"
    return info


def is_random(weights) -> bool:
    return str(weights).startswith("random")


def weight_source(backbone_weights, checkpoint=None, backbone_name: str | None = None) -> dict:
    """The weights behind a coarse map: the backbone's (``Backbone.weights``) and, for trained backends, the
    checkpoint's (:func:`checkpoint_source`); ``summary`` is the one line the tables print."""
    ckpt = checkpoint_source(checkpoint) if checkpoint else None
    random = is_random(backbone_weights) or bool(ckpt and is_random(ckpt.get("backbone_weights")))
    out = {"backbone": str(backbone_weights), "backbone_name": backbone_name, "checkpoint": ckpt, "random": random}
    out["summary"] = weight_summary(out)
    return out


def weight_summary(source: dict) -> str:
    """One line: random (first, so that it cannot be missed) or the checkpoint's origin, then the backbone."""
    name = source.get("backbone_name")
    backbone = f"backbone {name} ({source.get('backbone')})" if name else f"backbone {source.get('backbone')}"
    ckpt = source.get("checkpoint")
    if not ckpt:
        origin = None
    elif ckpt.get("kind") == "trained":
        origin = (f"trained by the pipeline at {code_label(ckpt.get('code'))} on {ckpt.get('auxiliary_dataset')}, "
                  f"{ckpt.get('epochs')} epochs (git blob {ckpt['git_blob']})")
    else:
        origin = (f"official file ({ckpt.get('official', 'official file')}), git blob {ckpt['git_blob']}, "
                  f"sha256 {ckpt['sha256']}")
    if source.get("random"):
        return f"{RANDOM_WEIGHTS} ({'; '.join(filter(None, [origin, backbone]))})"
    return f"{origin}; {backbone}" if origin else f"pretrained {backbone}"


# ------------------------------------------------------------------------------------ metrics sidecar
def metrics_provenance_path(metrics_csv) -> Path:
    """``results/metrics/.../<category>.csv`` -> ``.../<category>.provenance.json``."""
    return Path(metrics_csv).with_suffix(".provenance.json")


def store_records(attrs: dict) -> dict:
    """``{stage: {run, weights}}`` of a coarse or refined store's attributes (a refined store carries its
    coarse store's records under ``inputs``)."""
    stage = "refined" if "n_refined_by_ard" in attrs or attrs.get("stage") == "refined" else "coarse"
    out = {stage: {"run": attrs.get("run"), "weights": attrs.get("weights")}}
    for name, record in (attrs.get("inputs") or {}).items():
        out[name] = record
    return out


def write_metrics_provenance(metrics_csv, source, store_attrs: dict, settings=None) -> Path:
    """The metrics stage's sidecar: its own run record and the records of the store it scored."""
    from .io import write_json_atomic

    doc = {"format": "anorefiner-metrics-provenance/1", "source": str(source),
           "metrics": run_record(settings=settings), "stages": store_records(store_attrs)}
    return write_json_atomic(metrics_provenance_path(metrics_csv), doc)
