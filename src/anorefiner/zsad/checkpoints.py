"""Official checkpoints of the trained CLIP backends, verified by git blob id.

The APRIL-GAN repository ships its adapters in git (``exps/pretrained/{mvtec,visa}_pretrained.pth``,
committed at 26f19a6 and never changed; specs/backends.md section 1). No SHA-256 is published, so
a download is verified by its git blob id: ``sha1(b"blob <size>\\0" + content)``, what
``git hash-object`` prints. The names say which dataset the adapters were *trained on*: the
VisA-trained file scores MVTec AD and vice versa. AnomalyCLIP's prompt learners are in its repository too
(specs/tta.md B.1). VCP-CLIP's and AdaCLIP's files are on Google Drive with no checksum: they are listed
without a blob id and used only from a local file the user downloaded (keys and shapes checked).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..log import LOG

_APRIL = "https://github.com/ByChelsea/VAND-APRIL-GAN/raw/26f19a6cd50eed387c443d3cfad49dbfba9ab8ee/exps/pretrained/"
_ANOMALYCLIP = "https://github.com/zqhang/AnomalyCLIP/raw/45ed4dd35c05797d854294b5e8d585c545920089/checkpoints/"
_RARECLIP = "https://github.com/hy28hy/RareCLIP_v1/raw/a8e6d46ee2612a0edbf48c3b88e9998497e2b422/weights/"
#: backend type -> auxiliary (training) dataset -> url and git blob id (specs/backends.md section 1).
OFFICIAL = {
    "april_gan": {
        "visa": {"url": _APRIL + "visa_pretrained.pth", "git_blob": "86d6848c543f8393663d35c0333498ffb5ce9b68"},
        "mvtec_ad": {"url": _APRIL + "mvtec_pretrained.pth", "git_blob": "a057cec6c2ba5996baa0160a51e155908156813f"},
    },
    # specs/tta.md B.1: committed in the initial commit; "9_12_4_multiscale" was trained on VisA (scores MVTec AD)
    "anomalyclip": {
        "visa": {"url": _ANOMALYCLIP + "9_12_4_multiscale/epoch_15.pth",
                 "git_blob": "c90f1d9d92d158b436a8fc193f984d4cec8b1fc8"},
        "mvtec_ad": {"url": _ANOMALYCLIP + "9_12_4_multiscale_visa/epoch_15.pth",
                     "git_blob": "72adc786e031b49ea288ba5f815f0d38cf158708"},
    },
    # specs/backends.md section 3: in-repo weights of hy28hy/RareCLIP_v1 (uploaded in 550e6cb, unchanged since)
    "rareclip": {
        "visa": {"url": _RARECLIP + "visa_pretrained.pth", "git_blob": "2827c741c147ac57ee05144483193ad7e588698e"},
        "mvtec_ad": {"url": _RARECLIP + "mvtec_pretrained.pth", "git_blob": "a7826d01ee7305edf740566874eb180dcccd2d33"},
    },
    # Google Drive only, no checksum published (specs/backends.md section 2, specs/tta.md B.2): no git_blob, so
    # train-backend accepts only a file the user downloaded (backends.<name>.official.<aux>.url), keys and shapes checked
    "vcp_clip": {  # README: train_visa.pth / train_mvtec.pth (the latter's link replaced on 2024-09-11, 8f8d4db,
        #            formerly 1eKuE7FbyGXgs7n2nKlGWD1tDcu69wt4a)
        "visa": {"url": "https://drive.google.com/file/d/1MOTaN2hf6ejraTzax6Fnr0fa_b2ZMzjN", "git_blob": None},
        "mvtec_ad": {"url": "https://drive.google.com/file/d/1uJE25wx2OgSbVPMhR2rbOO5ey0r9UkTr", "git_blob": None},
    },
    "adaclip": {  # pretrained_visa_clinicdb.pth / pretrained_mvtec_colondb.pth (the names say the training sets;
        #           pretrained_all.pth, 1Cgkfx3GAaSYnXPLolx-P7pFqYV0IVzZF, was trained on everything)
        "visa": {"url": "https://drive.google.com/file/d/1QGmPB0ByPZQ7FucvGODMSz7r5Ke5wx9W", "git_blob": None},
        "mvtec_ad": {"url": "https://drive.google.com/file/d/1xVXANHGuJBRx59rqPRir7iqbkYzq45W0", "git_blob": None},
    },
}


def git_blob_id(path: str | Path, chunk: int = 1 << 20) -> str:
    """``git hash-object <path>``: SHA-1 of ``b"blob <size>\\0"`` followed by the file's bytes."""
    path = Path(path)
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_git_blob(path: str | Path, expected: str) -> None:
    expected = str(expected).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{40}", expected):
        raise ValueError(f"git blob id {expected!r} is not 40 hexadecimal digits")
    actual = git_blob_id(path)
    if actual != expected:
        raise ValueError(f"checkpoint {path}: git blob id {actual} does not match the expected {expected} "
                         f"(wrong or corrupted file)")


def official_source(backend_type: str, auxiliary: str) -> dict:
    try:
        return OFFICIAL[backend_type][auxiliary]
    except KeyError:
        known = {k: sorted(v) for k, v in OFFICIAL.items()}
        raise ValueError(f"no official {backend_type!r} checkpoint trained on {auxiliary!r} (known: {known})") from None


def fetch_checkpoint(url: str, dest: str | Path, git_blob: str, options=None) -> Path:
    """Download ``url`` (the project's resuming downloader) to ``dest`` and verify its git blob id.

    A local file (``url`` without a scheme) is verified and copied. Nothing is left at ``dest`` on
    failure; the download's ``.partial`` file stays for resuming.
    """
    import shutil

    from ..data.download import DownloadOptions, download_partial
    from ..io import atomic_path

    dest = Path(dest)
    options = options or DownloadOptions()
    if "://" not in url:
        src = Path(url)
        if not src.is_file():
            raise FileNotFoundError(f"checkpoint file {src} does not exist")
        verify_git_blob(src, git_blob)
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = download_partial(url, dest.with_name(dest.name + ".partial"), options,
                               "Download it by hand and set the config key backends.<name>.official_checkpoint "
                               "to its path.")
    try:
        verify_git_blob(partial, git_blob)
    except ValueError:
        bad = partial.with_name(dest.name + ".bad-git-blob")
        os.replace(partial, bad)
        raise
    os.replace(partial, dest)
    LOG.info("downloaded and verified (git blob %s) %s", git_blob, dest)
    return dest


def load_weights_only(path: str | Path, what: str):
    """``torch.load(path, weights_only=True)`` on CPU; errors name ``what`` (e.g. "vcp_clip checkpoint") and
    the file: a missing file, or one that is not a weights-only torch file (nothing is unpickled)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure: not a tensor checkpoint
        raise ValueError(f"{what} {path}: not a weights-only torch file ({err})") from None


def check_state(path: str | Path, what: str, expected: dict, got: dict, part: str = "", hint: str = "") -> None:
    """``got`` has exactly ``expected``'s keys and each tensor its shape, else ``ValueError`` naming ``what``, the
    file, ``part`` (a sub-dict's name) and the key; ``hint`` is added to a shape error (the widths expected)."""
    import torch

    prefix = f"{part}." if part else ""
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise ValueError(f"{what} {path}: {part or 'the state dict'} lacks {missing[:5]} / has unexpected "
                         f"{extra[:5]}")
    for key, ref in expected.items():
        value = got[key]
        if not torch.is_tensor(value) or tuple(value.shape) != tuple(ref.shape):
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"{what} {path}: {prefix}{key} has shape {shape}, expected {tuple(ref.shape)}{hint}")


def training_info(config, losses, rows, backbone, start: float, meta: dict | None = None, **extra) -> dict:
    """The ``meta`` dict of a trained backend's checkpoint (plain values only, so it loads weights-only):
    the options, per-epoch mean losses, the classes and number of training images, the backbone, the time, and
    the run record (commit, packages, device: :func:`anorefiner.provenance.run_record`)."""
    import json
    import time
    from dataclasses import asdict

    from ..provenance import run_record

    info = {"train_config": json.dumps(asdict(config), default=str), "epoch_losses": [float(v) for v in losses],
            "classes": sorted({r["category"] for r in rows}), "n_images": len(rows),
            "backbone": json.dumps(backbone.identity, default=str), "seconds": float(time.time() - start),
            "run": json.dumps(run_record(getattr(backbone, "device", None), asdict(config)), default=str), **extra}
    info.update({k: (v if isinstance(v, (str, int, float)) else json.dumps(v, default=str))
                 for k, v in (meta or {}).items()})
    return info


def save_checkpoint(out: str | Path, payload: dict, info: dict) -> Path:
    """Write ``{**payload, "meta": info}`` atomically (a killed job leaves no partial checkpoint)."""
    import torch

    from ..io import atomic_path

    with atomic_path(out) as tmp:
        torch.save({**payload, "meta": info}, tmp)
    return Path(out)


def check_finite_loss(name: str, epoch: int, loss: float) -> None:
    """Stop a diverged training with the epoch and the loss."""
    import math

    if not math.isfinite(loss):
        raise ValueError(f"{name} training diverged at epoch {epoch} (loss {loss})")
