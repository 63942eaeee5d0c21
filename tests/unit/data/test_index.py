"""Dataset index, image and mask loading, layout checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anorefiner.data import index as idx
from anorefiner.data.index import (
    COLUMNS,
    DatasetError,
    check_category,
    index_category,
    index_dataset,
    list_categories,
    load_image,
    load_mask,
    read_index,
)


def _save(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def _toy(root, category="toy", size=(20, 30)):
    """A tiny hand-made MVTec-layout category: 2 train, 1 good + 2 'dent' test images."""
    rng = np.random.default_rng(0)
    cat = root / category
    img = lambda: rng.integers(0, 255, (*size, 3), dtype=np.uint8)  # noqa: E731
    for name in ("001.png", "000.png"):
        _save(cat / "train" / "good" / name, img())
    _save(cat / "test" / "good" / "000.png", img())
    for stem in ("001", "000"):
        _save(cat / "test" / "dent" / f"{stem}.png", img())
        mask = np.zeros(size, np.uint8)
        mask[2:5, 3:9] = 255
        _save(cat / "ground_truth" / "dent" / f"{stem}_mask.png", mask)
    return root


def test_index_columns_order_and_ids(tmp_path):
    frame = index_category(_toy(tmp_path), "toy", dataset="mine")
    assert list(frame.columns) == COLUMNS
    assert frame["image_id"].tolist() == [
        "test/dent/000", "test/dent/001", "test/good/000", "train/good/000", "train/good/001"
    ]
    assert frame["label"].tolist() == [1, 1, 0, 0, 0]
    assert set(frame["dataset"]) == {"mine"} and set(frame["category"]) == {"toy"}
    assert frame["mask_path"].iloc[0].endswith("ground_truth/dent/000_mask.png")
    assert frame["mask_path"].iloc[2:].tolist() == [None, None, None]
    assert index_category(tmp_path, "toy", split="train")["split"].unique().tolist() == ["train"]
    assert len(index_category(tmp_path, "toy", split="test")) == 3


def test_bottle_counts_order_and_check(bottle_root):
    frame = index_category(bottle_root, "bottle")
    assert (frame["split"] == "train").sum() == 209
    test = frame[frame["split"] == "test"]
    assert len(test) == 83
    assert (test["label"] == 1).sum() == 63 and test.loc[test["label"] == 1, "mask_path"].notna().all()
    per_defect = test.groupby("defect").size().to_dict()
    assert per_defect == {"broken_large": 20, "broken_small": 22, "contamination": 21, "good": 20}
    keys = list(zip(frame["split"], frame["defect"], frame["image_path"]))
    assert keys == sorted(keys)
    assert frame["image_id"].is_unique
    summary = check_category(frame[frame["split"] == "test"])
    assert summary["anomalous"] == 63 and summary["empty_masks"] == 0
    mask = load_mask(test["mask_path"].iloc[0], expected_size=(900, 900))
    assert mask.dtype == bool and 0 < mask.mean() < 0.5


def test_index_dataset_and_categories(demo_dataset):
    assert list_categories(demo_dataset) == ["tiles", "widget"]
    frame = index_dataset(demo_dataset, dataset="demo")
    assert frame["category"].unique().tolist() == ["tiles", "widget"]
    assert len(frame) == 36
    one = index_dataset(demo_dataset, ["widget"], dataset="demo", split="test")
    assert len(one) == 12 and one["label"].sum() == 6


def test_load_image_converts_to_rgb(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = load_image(_save(tmp_path / "g.png", grey))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert (out[..., 0] == grey).all() and (out[..., 2] == grey).all()
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    out = load_image(_save(tmp_path / "a.png", rgba))
    assert out.shape == (3, 4, 3) and (out[..., 0] == 200).all()
    deep = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d16.png")
    out = load_image(tmp_path / "d16.png")
    assert out.dtype == np.uint8 and out[..., 0].max() == round(55000 / 257) and out[0, 0, 0] == 0
    pal = Image.fromarray(np.full((3, 4, 3), 90, np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(tmp_path / "p.png")
    assert (load_image(tmp_path / "p.png") == 90).all()
    Image.fromarray(np.full((3, 4, 3), 90, np.uint8)).save(tmp_path / "j.JPG", format="JPEG")
    assert load_image(tmp_path / "j.JPG").shape == (3, 4, 3)


def test_load_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DatasetError, match="broken.png"):
        load_image(bad)
    with pytest.raises(FileNotFoundError, match="absent.png"):
        load_image(tmp_path / "absent.png")
    good = _save(tmp_path / "trunc.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    good.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DatasetError, match="trunc.png"):
        load_image(good)


def test_load_mask_thresholds_and_size(tmp_path):
    m = np.zeros((4, 5), np.uint8)
    m[1, 1], m[2, 2], m[3, 3] = 255, 127, 128  # 8-bit mask: anomalous where >= 128
    out = load_mask(_save(tmp_path / "m.png", m))
    assert out.dtype == bool and out.sum() == 2 and out[1, 1] and not out[2, 2]
    labels = np.zeros((4, 5), np.uint8)
    labels[0, 0], labels[1, 0] = 1, 3  # 0/1 or instance-label masks: anomalous where > 0
    assert load_mask(_save(tmp_path / "l.png", labels)).sum() == 2
    Image.fromarray(labels.astype(np.uint16)).save(tmp_path / "l16.png")  # 16-bit 0/1 mask
    assert load_mask(tmp_path / "l16.png").sum() == 2
    Image.fromarray((m.astype(np.uint16) * 257)).save(tmp_path / "m16.png")  # 16-bit 0/65535
    np.testing.assert_array_equal(load_mask(tmp_path / "m16.png"), out)
    red = np.zeros((4, 5, 3), np.uint8)
    red[0, 1, 0] = 255  # a colour mask marked in red: brightest channel counts
    assert load_mask(_save(tmp_path / "red.png", red)).sum() == 1
    with pytest.raises(DatasetError, match=r"m\.png is 4x5 .* image is 6x5"):
        load_mask(tmp_path / "m.png", expected_size=(6, 5))


def test_unknown_category_names_it_and_lists_available(tmp_path):
    _toy(tmp_path, "alpha")
    _toy(tmp_path, "beta")
    with pytest.raises(FileNotFoundError, match="'gamma'.*available: alpha, beta"):
        index_category(tmp_path, "gamma")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_categories(tmp_path / "nowhere")


def test_anomalous_image_without_mask(tmp_path):
    _toy(tmp_path)
    (tmp_path / "toy" / "ground_truth" / "dent" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"test/dent/001\.png has no mask"):
        index_category(tmp_path, "toy")


def test_visa_style_mask_name_and_good_mask_ignored(tmp_path):
    _toy(tmp_path)
    gt = tmp_path / "toy" / "ground_truth"
    (gt / "dent" / "001_mask.png").rename(gt / "dent" / "001.png")
    _save(gt / "good" / "000_mask.png", np.zeros((20, 30), np.uint8))
    frame = index_category(tmp_path, "toy")
    assert frame.set_index("image_id").loc["test/dent/001", "mask_path"].endswith("dent/001.png")
    assert frame.set_index("image_id").loc["test/good/000", "mask_path"] is None


def test_missing_folders_are_named(tmp_path):
    _toy(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "toy" / "test")
    with pytest.raises(FileNotFoundError, match=r"toy/test"):
        index_category(tmp_path, "toy")
    assert len(index_category(tmp_path, "toy", split="train")) == 2


def test_check_category_reports_size_mismatch_and_corrupt_image(tmp_path):
    _toy(tmp_path)
    _save(tmp_path / "toy" / "ground_truth" / "dent" / "000_mask.png", np.zeros((10, 10), np.uint8))
    (tmp_path / "toy" / "test" / "good" / "000.png").write_bytes(b"garbage")
    frame = index_category(tmp_path, "toy", check_sizes=False)  # indexing itself refuses the mask (below)
    with pytest.raises(DatasetError) as err:
        check_category(frame)
    text = str(err.value)
    assert "2 problem(s)" in text
    assert "000_mask.png is 10x10 (HxW) but its image is 20x30" in text
    assert "good/000.png" in text


def test_index_cli_writes_csv_and_read_back(tmp_path):
    from anorefiner.cli import main

    _toy(tmp_path / "data")
    out = tmp_path / "idx" / "toy.csv"
    assert main(["index", "--root", str(tmp_path / "data"), "--dataset", "mine", "--category", "toy",
                 "--out", str(out), "--check"]) == 0
    back = read_index(out)
    direct = index_category(tmp_path / "data", "toy", dataset="mine")
    pd.testing.assert_frame_equal(back, direct)
    assert main(["index", "--root", str(tmp_path / "data"), "--category", "nope"]) == 1
    assert not list(out.parent.glob(".*tmp"))


def test_duplicate_stems_are_rejected(tmp_path):
    _toy(tmp_path)
    _save(tmp_path / "toy" / "train" / "good" / "000.jpg", np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(DatasetError, match="train/good/000"):
        index_category(tmp_path, "toy")
    assert idx.IMAGE_EXTENSIONS >= {".png", ".jpg", ".jpeg", ".bmp", ".tif"}


def test_index_names_a_mask_of_another_size_before_any_compute(tmp_path):
    """A 10x10 mask beside a 20x30 image fails at indexing, naming the mask, its image and both sizes."""
    _toy(tmp_path)
    bad = _save(tmp_path / "toy" / "ground_truth" / "dent" / "001_mask.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(DatasetError) as err:
        index_category(tmp_path, "toy")
    text = str(err.value)
    assert f"mask {bad} is 10x10 (HxW)" in text and "test/dent/001.png is 20x30" in text
    assert len(index_category(tmp_path, "toy", split="train")) == 2  # the train split has no masks
