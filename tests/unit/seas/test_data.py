"""Which images SeaS trains on (the official selection), and its augmented, paired batches."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anorefiner.data.index import index_category
from anorefiner.seas.data import batches, load_example, model_record, select_training_set, transform


def test_the_first_third_of_each_defect_type_in_file_name_order(demo_dataset):
    frame = index_category(demo_dataset, "widget", dataset="demo")
    data = select_training_set(demo_dataset, "widget", "demo", divisor=3, num_normal=4)
    test = frame[(frame["split"] == "test") & (frame["label"] == 1)]
    assert data.defect_types == sorted(test["defect"].unique())
    expected = []
    for defect in data.defect_types:  # seas_dataset.py L106: max(int(n / 3), 1) images: 000.png, 001.png, ...
        names = sorted(test[test["defect"] == defect]["image_id"])
        expected += names[: max(len(names) // 3, 1)]
    assert data.anomaly_ids == expected
    assert [data.defect_types[k] for k in data.labels] == [i.split("/")[1] for i in data.anomaly_ids]
    assert all(m.endswith("_mask.png") for m in data.mask_paths)
    assert data.normal_ids == sorted(frame[frame["split"] == "train"]["image_id"])[:4]
    assert data.manifest()["anomaly_ids"] == expected


def test_a_category_without_anomalies_is_refused(tmp_path):
    for split, name in (("train", "good"), ("test", "good")):
        (tmp_path / "cat" / split / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "cat" / split / name / "000.png")
    with pytest.raises(ValueError, match="no anomalous test images"):
        select_training_set(tmp_path, "cat", "demo")


def test_rotation_and_flip_move_image_mask_and_normal_alike(tmp_path):
    img = np.zeros((16, 16, 3), np.uint8)
    img[0:4, 0:2] = 255  # a mark in the top-left corner
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img[..., 0]).save(tmp_path / "m.png")
    Image.fromarray(img).save(tmp_path / "n.png")
    for angle in (0, 90, 180, 270):
        for flip in (None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM):
            ex = load_example(str(tmp_path / "a.png"), str(tmp_path / "m.png"), str(tmp_path / "n.png"), 16, angle,
                              flip)
            anomaly = ex["anomaly"][0] > 0
            assert (anomaly == (ex["mask"][0] > 0.5)).all() and (ex["normal"] == ex["anomaly"]).all()
            expected = np.asarray(transform(Image.fromarray(img[..., 0]), 16, angle, flip)) > 127
            assert (anomaly.numpy() == expected).all()
    ex = load_example(str(tmp_path / "a.png"), str(tmp_path / "m.png"), None, 8, 0, None)
    assert ex["anomaly"].shape == (3, 8, 8) and -1 <= float(ex["anomaly"].min()) and float(ex["anomaly"].max()) <= 1
    assert 0 < float(ex["mask"].max()) <= 1 and "normal" not in ex


def test_batches_pair_examples_and_are_seeded(demo_dataset):
    data = select_training_set(demo_dataset, "widget", "demo", num_normal=6)
    a = batches(data, 32, 2, np.random.default_rng(0), rotation=True)
    b = batches(data, 32, 2, np.random.default_rng(0), rotation=True)
    # an epoch is max(A, N) = 6 examples: 3 batches, the last one marks the epoch's end
    first = [next(a) for _ in range(4)]
    assert [x["end"] for x in first] == [False, False, True, False]
    for x, y in zip(first, (next(b) for _ in range(4))):
        assert all((x[k] == y[k]).all() for k in ("anomaly", "mask", "normal", "label"))
    assert first[0]["anomaly"].shape == (2, 3, 32, 32) and first[0]["mask"].shape == (2, 1, 32, 32)
    assert first[0]["normal"].shape == (2, 3, 32, 32) and first[0]["label"].dtype.is_floating_point is False


def test_model_record_names_the_training_images(seas_model):
    record = model_record(seas_model)
    assert len(record["manifest_sha256"]) == 64 and record["trained_on"]
    assert all(i.startswith("test/") for i in record["trained_on"])
    with pytest.raises(FileNotFoundError, match="not a trained SeaS model"):
        model_record(seas_model.parent)
