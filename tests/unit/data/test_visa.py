"""VisA -> MVTec layout conversion with the one-class split and binary masks."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anorefiner.data import visa
from anorefiner.data.download import prepare_dataset
from anorefiner.data.extract import MARKER, read_marker
from anorefiner.data.sources import validate_mvtec_root
from anorefiner.data.visa import convert_visa, read_split_csv

HEADER = "object,split,label,image,mask\n"


def make_visa(root: Path, categories=("candle", "pcb1")) -> Path:
    """A VisA-like tree: per category 2 train normals, 1 test normal, 2 test anomalies."""
    rng = np.random.default_rng(0)
    lines = [HEADER]
    for cat in categories:
        data = root / cat / "Data"
        (data / "Images" / "Normal").mkdir(parents=True)
        (data / "Images" / "Anomaly").mkdir(parents=True)
        (data / "Masks" / "Anomaly").mkdir(parents=True)
        for i, split in enumerate(("train", "train", "test")):
            Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(data / "Images" / "Normal" / f"{i:04d}.JPG")
            lines.append(f"{cat},{split},normal,{cat}/Data/Images/Normal/{i:04d}.JPG,\n")
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(data / "Images" / "Anomaly" / f"{i:03d}.JPG")
            mask = np.zeros((12, 16), np.uint8)
            mask[2:5, 3:9] = 1 + i  # VisA masks hold small class ids, not 255
            Image.fromarray(mask).save(data / "Masks" / "Anomaly" / f"{i:03d}.png")
            lines.append(f"{cat},test,anomaly,{cat}/Data/Images/Anomaly/{i:03d}.JPG,{cat}/Data/Masks/Anomaly/{i:03d}.png\n")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("".join(lines))
    return root


def test_conversion_layout_and_binary_masks(tmp_path):
    raw = make_visa(tmp_path / "raw")
    dest = convert_visa(raw, tmp_path / "visa")
    assert validate_mvtec_root(dest) == ["candle", "pcb1"]
    cat = dest / "candle"
    assert sorted(p.name for p in (cat / "train" / "good").iterdir()) == ["0000.JPG", "0001.JPG"]
    assert sorted(p.name for p in (cat / "test" / "good").iterdir()) == ["0002.JPG"]
    assert sorted(p.name for p in (cat / "test" / "anomaly").iterdir()) == ["000.JPG", "001.JPG"]
    src = raw / "candle" / "Data" / "Images" / "Anomaly" / "001.JPG"
    assert (cat / "test" / "anomaly" / "001.JPG").read_bytes() == src.read_bytes()  # not re-encoded
    for i in range(2):
        mask = np.asarray(Image.open(cat / "ground_truth" / "anomaly" / f"{i:03d}_mask.png"))
        assert mask.dtype == np.uint8 and mask.shape == (12, 16)
        assert set(np.unique(mask)) == {0, 255} and mask[2:5, 3:9].all() and mask.sum() == 18 * 255
    marker = read_marker(dest)
    assert marker["counts"]["pcb1"] == {"train/good": 2, "test/good": 1, "test/anomaly": 2}
    assert not (tmp_path / "visa.partial-convert").exists()


def test_conversion_is_idempotent(tmp_path, monkeypatch):
    raw = make_visa(tmp_path / "raw")
    dest = convert_visa(raw, tmp_path / "visa")
    before = read_marker(dest)

    def boom(*args):
        raise AssertionError("conversion should have been skipped")

    monkeypatch.setattr(visa, "_link_or_copy", boom)
    convert_visa(raw, dest)
    assert read_marker(dest) == before


def test_killed_conversion_leaves_no_marker_and_rerun_succeeds(tmp_path, monkeypatch):
    raw = make_visa(tmp_path / "raw")
    real = visa.binarise_mask
    calls = []

    def dies(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        real(src, dst)

    monkeypatch.setattr(visa, "binarise_mask", dies)
    with pytest.raises(KeyboardInterrupt):
        convert_visa(raw, tmp_path / "visa")
    assert not (tmp_path / "visa").exists() and (tmp_path / "visa.partial-convert").is_dir()
    monkeypatch.setattr(visa, "binarise_mask", real)
    dest = convert_visa(raw, tmp_path / "visa")
    assert (dest / MARKER).is_file() and not (tmp_path / "visa.partial-convert").exists()
    assert len(list(dest.glob("*/ground_truth/anomaly/*_mask.png"))) == 4


@pytest.mark.parametrize("edit,error,needle", [
    (lambda t: t.replace("label,", "lbl,"), ValueError, "missing column.*label"),
    (lambda t: t.replace("candle,train,normal", "candle,train,anomaly", 1), ValueError, r"1cls\.csv:2: an anomalous"),
    (lambda t: t.replace("candle,test,normal", "candle,val,normal", 1), ValueError, "split 'val'"),
    (lambda t: t.replace("Normal/0000.JPG", "Normal/9999.JPG", 1), FileNotFoundError, r"1cls\.csv:2: image .*9999\.JPG"),
    (lambda t: t + "candle,train,normal,pcb1/Data/Images/Normal/0000.JPG,\n", ValueError, "lines 2 and 12 both map"),
])
def test_bad_split_csv_is_named(tmp_path, edit, error, needle):
    raw = make_visa(tmp_path / "raw")
    csv_path = raw / "split_csv" / "1cls.csv"
    csv_path.write_text(edit(csv_path.read_text()))
    with pytest.raises(error, match=needle):
        convert_visa(raw, tmp_path / "visa")
    assert not (tmp_path / "visa").exists()


def test_read_split_csv_rows(tmp_path):
    rows = read_split_csv(make_visa(tmp_path / "raw", categories=("fryum",)))
    assert [(r.split, r.anomalous) for r in rows] == [("train", False)] * 2 + [("test", False)] + [("test", True)] * 2
    assert rows[3].mask.name == "000.png" and rows[0].mask is None


def test_prepare_visa_from_archive_and_from_raw_root(tmp_path):
    raw = make_visa(tmp_path / "raw")
    archive = tmp_path / "VisA_20220922.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(raw.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=f"VisA/{path.relative_to(raw).as_posix()}")  # wrapped in one folder
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    dest = prepare_dataset("visa", tmp_path / "datasets" / "visa", tmp_path / "dl", archive=archive, sha256=sha)
    assert validate_mvtec_root(dest) == ["candle", "pcb1"]
    assert read_marker(dest)["archive_sha256"] == sha
    assert read_marker(tmp_path / "datasets" / "visa.raw")["archive_sha256"] == sha
    # An already-extracted raw VisA folder is converted too.
    other = prepare_dataset("visa", tmp_path / "visa2", tmp_path / "dl", root=raw)
    assert validate_mvtec_root(other) == ["candle", "pcb1"]
