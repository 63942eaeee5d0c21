"""What SeaS trains on, and its batches (HUST-SLOW/SeaS ``datasets/seas_dataset.py`` at 4645d3b).

SeaS learns from a few real anomaly images of each defect type, taken from the *test* split: the official
dataset counts ``max(int(n / 3), 1)`` images in each ``test/<defect>`` folder (L103-L106) and opens
``000.png, 001.png, ...`` (L185-L186), i.e. the first third in file-name order. :func:`select_training_set`
picks the same images (index order = file-name order); they must not be scored afterwards, so their ids travel
with the model (``manifest.json``) into PGT's store and the metrics stage drops them (docs/reproduction.md).
The normal images of the Normal-image Alignment are the first ``num_normal_images`` of ``train/good``
(the official code lists the folder in file-system order, L122-L124; here file-name order).

Batches (L168-L235, L238-L275): example ``i`` pairs anomaly ``i mod A`` with normal image ``i mod N`` over
``max(A, N)`` examples per epoch, shuffled; one random rotation (0/90/180/270) and flip (none, left-right,
top-bottom) per example is applied to the anomaly image, its mask and the normal image alike (the transforms
share their state until ``reset``, L116-L117, L232-L233); images are resized bilinearly to the training
resolution and scaled to [-1, 1], masks to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROTATIONS = (0, 90, 180, 270)
FLIPS = (None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM)
_ROTATE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


@dataclass
class TrainingSet:
    """The anomaly images (with masks and defect-type labels) and normal images of one category."""

    defect_types: list[str]
    anomaly_ids: list[str]
    anomaly_paths: list[str]
    mask_paths: list[str]
    labels: list[int]  # index into defect_types
    normal_ids: list[str]
    normal_paths: list[str]
    counts: dict[str, int] = field(default_factory=dict)  # anomalous test images per defect type

    def manifest(self) -> dict:
        return {"defect_types": self.defect_types, "anomaly_ids": self.anomaly_ids, "labels": self.labels,
                "normal_ids": self.normal_ids, "anomalous_test_images": self.counts}


def select_training_set(root, category: str, dataset: str, divisor: int = 3, num_normal: int = 60) -> TrainingSet:
    """The official selection (module docstring) from the dataset index of ``root/category``."""
    from ..data.index import index_category

    frame = index_category(root, category, dataset=dataset)
    test = frame[(frame["split"] == "test") & (frame["label"] == 1)]
    types = sorted(test["defect"].unique())
    if not types:
        raise ValueError(f"{root}/{category}: no anomalous test images, SeaS has nothing to learn from")
    out = TrainingSet(defect_types=list(types), anomaly_ids=[], anomaly_paths=[], mask_paths=[], labels=[],
                      normal_ids=[], normal_paths=[])
    for label, defect in enumerate(types):
        rows = test[test["defect"] == defect]  # index order: file names sorted
        out.counts[defect] = len(rows)
        take = rows.iloc[: max(len(rows) // int(divisor), 1)]
        out.anomaly_ids += list(take["image_id"])
        out.anomaly_paths += list(take["image_path"])
        out.mask_paths += list(take["mask_path"])
        out.labels += [label] * len(take)
    good = frame[frame["split"] == "train"].iloc[: int(num_normal)]
    if good.empty:
        raise ValueError(f"{root}/{category}/train/good has no images for SeaS's Normal-image Alignment")
    out.normal_ids, out.normal_paths = list(good["image_id"]), list(good["image_path"])
    return out


def transform(img: Image.Image, size: int, angle: int = 0, flip=None) -> Image.Image:
    """Rotation, flip, then a bilinear resize of the shorter side to ``size`` and a centre crop (L131-L150)."""
    if angle:
        img = img.transpose(_ROTATE[angle])
    if flip is not None:
        img = img.transpose(flip)
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image → float32 [3,H,W] in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1) * 2.0 - 1.0


def mask_tensor(img: Image.Image) -> torch.Tensor:
    """Mask image → float32 [1,H,W] in [0, 1] (ToTensor of the resized mask: edges keep fractional values)."""
    return torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)[None]


def load_example(anomaly: str, mask: str, normal: str | None, size: int, angle: int, flip) -> dict:
    """One example: anomaly image, its mask and the paired normal image under one rotation and flip."""
    out = {"anomaly": image_tensor(transform(Image.open(anomaly), size, angle, flip)),
           "mask": mask_tensor(transform(Image.open(mask), size, angle, flip))}
    if normal is not None:
        out["normal"] = image_tensor(transform(Image.open(normal), size, angle, flip))
    return out


def batches(data: TrainingSet, size: int, batch_size: int, gen: np.random.Generator, rotation: bool,
            with_normals: bool = True):
    """Endless batches ``{"anomaly" [B,3,S,S], "mask" [B,1,S,S], "normal" [B,3,S,S], "label" [B], "end"}``.

    One epoch is a seeded permutation of ``max(A, N)`` examples (module docstring); incomplete final batches are
    dropped. ``end`` is True on an epoch's last batch (where the official accelerate loop steps the optimiser)."""
    n_anom, n_norm = len(data.anomaly_paths), len(data.normal_paths)
    length = max(n_anom, n_norm) if with_normals else n_anom
    if length < batch_size:
        raise ValueError(f"SeaS: {length} training examples cannot fill a batch of {batch_size}")
    while True:
        order = gen.permutation(length)
        n_batches = length // batch_size
        for b in range(n_batches):
            items = []
            for i in order[b * batch_size:(b + 1) * batch_size]:
                a = int(i) % n_anom
                angle = ROTATIONS[int(gen.integers(len(ROTATIONS)))] if rotation else 0
                flip = FLIPS[int(gen.integers(len(FLIPS)))] if rotation else None
                normal = data.normal_paths[int(i) % n_norm] if with_normals else None
                items.append({**load_example(data.anomaly_paths[a], data.mask_paths[a], normal, size, angle, flip),
                              "label": data.labels[a]})
            batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "label"}
            batch["label"] = torch.as_tensor([it["label"] for it in items])
            batch["end"] = b == n_batches - 1
            yield batch


def model_record(model_dir: str | Path) -> dict:
    """What a refined store records about the SeaS model it used: its folder, the SHA-256 of its manifest (which
    pins its training) and the test images it learnt from (``trained_on``, to be left out of scoring)."""
    import hashlib
    import json

    path = Path(model_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a trained SeaS model (no manifest.json; rule train_seas)")
    text = path.read_bytes()
    manifest = json.loads(text)
    return {"path": str(model_dir), "manifest_sha256": hashlib.sha256(text).hexdigest(),
            "trained_on": list(manifest["training_set"]["anomaly_ids"])}
