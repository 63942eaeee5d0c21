"""Convert an extracted VisA archive to the MVTec layout with its one-class split.

VisA ships ``<category>/Data/Images/{Normal,Anomaly}/*.JPG`` and ``<category>/Data/Masks/Anomaly/*.png``
plus ``split_csv/1cls.csv`` (columns ``object, split, label, image, mask``) which defines the standard
one-class train/test split (``shared/specs/datasets.md``). The result is

    <dest>/<category>/train/good/<file>             (train, normal)
    <dest>/<category>/test/good/<file>              (test, normal)
    <dest>/<category>/test/anomaly/<file>           (test, anomaly; VisA has no defect names)
    <dest>/<category>/ground_truth/anomaly/<stem>_mask.png   (mask value > 0 -> 255)

Images are hard-linked (copied across file systems), never re-encoded. The whole conversion is
staged in ``<dest>.partial-convert/`` and published with a ``.complete`` marker, like extraction.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..log import LOG, progress
from .extract import publish_dir, read_marker

SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
DEFECT = "anomaly"  # VisA labels anomalies without a defect type; one folder holds them all


@dataclass(frozen=True)
class VisaRow:
    category: str
    split: str  # "train" | "test"
    anomalous: bool
    image: Path  # absolute
    mask: Path | None  # absolute; None for normal images
    line: int  # line in 1cls.csv, for error messages


def find_visa_root(path: str | Path) -> Path:
    """The folder holding ``split_csv/1cls.csv``: ``path`` itself or its single wrapper folder."""
    path = Path(path)
    if (path / SPLIT_CSV).is_file():
        return path
    candidates = [p for p in sorted(path.iterdir()) if (p / SPLIT_CSV).is_file()] if path.is_dir() else []
    if len(candidates) == 1:
        return candidates[0]
    raise FileNotFoundError(f"no {SPLIT_CSV} under {path}: is this an extracted VisA archive?")


def read_split_csv(visa_root: str | Path) -> list[VisaRow]:
    """Parse and validate ``split_csv/1cls.csv``; errors name the file, line, column and value."""
    visa_root = Path(visa_root)
    csv_path = visa_root / SPLIT_CSV
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
        rows = []
        for line, raw in enumerate(reader, start=2):
            rec = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            split, label = rec["split"].lower(), rec["label"].lower()
            if split not in ("train", "test"):
                raise ValueError(f"{csv_path}:{line}: split {rec['split']!r} is not 'train' or 'test'")
            if label not in ("normal", "anomaly"):
                raise ValueError(f"{csv_path}:{line}: label {rec['label']!r} is not 'normal' or 'anomaly'")
            anomalous = label == "anomaly"
            if split == "train" and anomalous:
                raise ValueError(f"{csv_path}:{line}: an anomalous image in the train split breaks the one-class setting")
            if not rec["object"] or not rec["image"]:
                raise ValueError(f"{csv_path}:{line}: empty object or image column")
            if anomalous and not rec["mask"]:
                raise ValueError(f"{csv_path}:{line}: anomalous image {rec['image']} has no mask")
            rows.append(VisaRow(rec["object"], split, anomalous, visa_root / rec["image"],
                                visa_root / rec["mask"] if anomalous else None, line))
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    return rows


def binarise_mask(src: Path, dst: Path) -> None:
    """Write ``src`` as an 8-bit PNG with anomaly (any value > 0) = 255 and background = 0."""
    with Image.open(src) as img:
        if img.mode in ("RGBA", "LA", "PA"):  # alpha says nothing about the anomaly
            img = img.convert("RGB" if img.mode == "RGBA" else "L")
        arr = np.asarray(img)  # palette images give indices: index 0 is the background
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    Image.fromarray(np.where(arr > 0, 255, 0).astype(np.uint8), mode="L").save(dst)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # other file system, or links not allowed
        shutil.copyfile(src, dst)


def _targets(row: VisaRow, staging: Path) -> tuple[Path, Path | None]:
    folder = staging / row.category / row.split / (DEFECT if row.anomalous else "good")
    image = folder / row.image.name
    mask = staging / row.category / "ground_truth" / DEFECT / f"{row.image.stem}_mask.png" if row.anomalous else None
    return image, mask


def convert_visa(visa_root: str | Path, dest: str | Path, *, archive_sha256: str | None = None) -> Path:
    """Convert an extracted VisA tree at ``visa_root`` into MVTec layout at ``dest``; idempotent.

    Skipped when ``dest`` already carries a marker for the same ``1cls.csv`` (and archive, when given).
    """
    visa_root, dest = Path(visa_root), Path(dest)
    csv_path = visa_root / SPLIT_CSV
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} not found: {visa_root} is not an extracted VisA archive")
    csv_sha = hashlib.sha256(csv_path.read_bytes()).hexdigest()
    marker = read_marker(dest)
    if (marker and marker.get("split_csv_sha256") == csv_sha
            and (archive_sha256 is None or marker.get("archive_sha256") == archive_sha256)):
        LOG.info("VisA already converted into %s (marker .complete)", dest)
        return dest
    rows = read_split_csv(visa_root)
    seen: dict[Path, int] = {}
    for row in rows:
        image_target, _ = _targets(row, dest)
        if image_target in seen:
            raise ValueError(f"{csv_path}: lines {seen[image_target]} and {row.line} both map to {image_target}")
        seen[image_target] = row.line
        for path, what in ((row.image, "image"), (row.mask, "mask")):
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"{csv_path}:{row.line}: {what} {path} does not exist")

    staging = dest.with_name(dest.name + ".partial-convert")
    if staging.exists():
        LOG.info("removing the unfinished conversion %s", staging)
        shutil.rmtree(staging)
    LOG.info("converting VisA %s into MVTec layout at %s", visa_root, dest)
    counts: dict[str, dict[str, int]] = {}
    for row in progress(rows, desc="VisA -> MVTec layout", unit="image"):
        image_target, mask_target = _targets(row, staging)
        image_target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(row.image, image_target)
        if mask_target is not None:
            mask_target.parent.mkdir(parents=True, exist_ok=True)
            binarise_mask(row.mask, mask_target)
        key = f"{row.split}/{DEFECT if row.anomalous else 'good'}"
        counts.setdefault(row.category, {}).setdefault(key, 0)
        counts[row.category][key] += 1
    publish_dir(staging, dest, {"source": "visa", "split_csv_sha256": csv_sha,
                                "archive_sha256": archive_sha256, "counts": counts})
    LOG.info("VisA converted: %d categories, %d images in %s", len(counts), len(rows), dest)
    return dest
