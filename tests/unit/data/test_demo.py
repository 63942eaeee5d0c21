"""The offline demo dataset: layout, exact masks, determinism, atomic writing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anorefiner.data import demo
from anorefiner.data.demo import GENERATORS, MARKER, generate_demo, render_test_image, defect_counts
from anorefiner.data.index import check_category, index_category


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_fixture_layout_and_counts(demo_dataset):
    cats = sorted(p.name for p in demo_dataset.iterdir() if p.is_dir())
    assert cats == ["tiles", "widget"]
    for cat in cats:
        root = demo_dataset / cat
        assert len(list((root / "train" / "good").glob("*.png"))) == 6
        tests = {d.name: len(list(d.glob("*.png"))) for d in (root / "test").iterdir()}
        assert sum(tests.values()) == 12
        assert tests["good"] == 6  # half of the test set carries a defect
        assert set(tests) == {"good", *GENERATORS[cat].defects}
        for defect, n in tests.items():
            masks = sorted((root / "ground_truth" / defect).glob("*_mask.png")) if defect != "good" else []
            assert len(masks) == (0 if defect == "good" else n)
            for m in masks:
                arr = _png(m)
                assert arr.shape == (64, 64) and set(np.unique(arr)) == {0, 255}
        img = _png(root / "test" / "good" / "000.png")
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    marker = json.loads((demo_dataset / MARKER).read_text())
    assert marker["params"]["categories"] == ["tiles", "widget"]


def test_fixture_indexes_and_checks(demo_dataset):
    for cat in ("tiles", "widget"):
        frame = index_category(demo_dataset, cat, dataset="demo")
        summary = check_category(frame)
        assert summary == {"images": 18, "train": 6, "test": 12, "anomalous": 6, "empty_masks": 0}


def test_files_equal_rendered_images_and_masks_are_exact(demo_dataset):
    """A saved defect image differs from its clean image exactly on the saved mask."""
    for cat in ("tiles", "widget"):
        for defect in GENERATORS[cat].defects:
            clean, image, mask = render_test_image(cat, defect, 0, 64, 0)
            np.testing.assert_array_equal(_png(demo_dataset / cat / "test" / defect / "000.png"), image)
            saved = _png(demo_dataset / cat / "ground_truth" / defect / "000_mask.png") > 0
            np.testing.assert_array_equal(saved, mask)
            np.testing.assert_array_equal(mask, np.any(image != clean, axis=-1))
            assert mask.any()


@pytest.mark.parametrize("category", sorted(GENERATORS))
def test_every_defect_kind_is_exact_and_bounded(category):
    size = 96
    for defect in GENERATORS[category].defects:
        for index in range(3):
            clean, image, mask = render_test_image(category, defect, index, size, seed=3)
            changed = np.any(image != clean, axis=-1)
            np.testing.assert_array_equal(mask, changed)
            assert 3 <= mask.sum() <= 0.3 * size * size, (category, defect, index, int(mask.sum()))


@pytest.mark.parametrize("category", sorted(GENERATORS))
def test_normal_images_vary(category):
    images = [demo.render_normal(category, "train", "good", j, 64, 0)[0].image for j in range(3)]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        diff = np.abs(images[a].astype(int) - images[b].astype(int)).mean()
        assert diff > 2.0, (category, a, b, diff)


def test_layout_splits_half_of_the_test_set():
    assert defect_counts("widget", 60) == {"good": 30, "displaced": 8, "missing": 8, "scratch": 7, "stain": 7}
    assert sum(defect_counts("tiles", 7).values()) == 7
    assert defect_counts("tiles", 7)["good"] == 4


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = dict(categories=("tiles", "widget"), image_size=48, n_train=2, n_test=4)
    a = _digest(generate_demo(tmp_path / "a", seed=5, **kw))
    b = _digest(generate_demo(tmp_path / "b", seed=5, **kw))
    c = _digest(generate_demo(tmp_path / "c", seed=6, **kw))
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in images)


def test_marker_skips_and_regenerates(tmp_path):
    root = tmp_path / "demo"
    generate_demo(root, categories=("tiles",), image_size=32, n_train=1, n_test=2, seed=0)
    probe = root / "tiles" / "train" / "good" / "000.png"
    probe.write_bytes(b"edited")  # a rerun with the same parameters must not touch the folder
    generate_demo(root, categories=("tiles",), image_size=32, n_train=1, n_test=2, seed=0)
    assert probe.read_bytes() == b"edited"
    generate_demo(root, categories=("tiles",), image_size=32, n_train=2, n_test=2, seed=0)
    assert probe.read_bytes() != b"edited"
    assert len(list((root / "tiles" / "train" / "good").glob("*.png"))) == 2
    assert json.loads((root / MARKER).read_text())["params"]["n_train"] == 2
    assert not (tmp_path / "demo.partial").exists() and not (tmp_path / "demo.old").exists()
    (root / MARKER).unlink()  # Snakemake removes the output marker before it reruns the rule
    generate_demo(root, categories=("tiles",), image_size=32, n_train=1, n_test=2, seed=0)
    assert (root / MARKER).is_file() and not (root / "tiles" / "train" / "good" / "001.png").exists()


def test_killed_generation_never_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    real = demo._write_category
    calls = []

    def dies_on_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "_write_category", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        generate_demo(root, categories=("tiles", "widget"), image_size=32, n_train=1, n_test=2)
    assert not root.exists()
    assert (tmp_path / "demo.partial" / "tiles").is_dir()
    monkeypatch.setattr(demo, "_write_category", real)
    generate_demo(root, categories=("tiles", "widget"), image_size=32, n_train=1, n_test=2)
    assert (root / MARKER).is_file() and (root / "widget" / "test" / "good").is_dir()
    assert not (tmp_path / "demo.partial").exists()


def test_refuses_foreign_folder_and_bad_arguments(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="mine.*no .complete marker"):
        generate_demo(foreign, categories=("tiles",), image_size=32, n_train=1, n_test=2)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="'marble'.*available: brick, grass, gravel, tiles, widget"):
        generate_demo(tmp_path / "x", categories=("marble",))
    with pytest.raises(ValueError, match="image_size"):
        generate_demo(tmp_path / "x", categories=("tiles",), image_size=8)
    with pytest.raises(ValueError, match="n_test"):
        generate_demo(tmp_path / "x", categories=("tiles",), n_test=1)


def test_cli_demo_data(tmp_path):
    from anorefiner.cli import main

    out = tmp_path / "cli_demo"
    rc = main(["demo-data", "--out", str(out), "--categories", "gravel", "--image-size", "32",
               "--n-train", "1", "--n-test", "2", "--seed", "1"])
    assert rc == 0
    assert json.loads((out / MARKER).read_text())["params"]["categories"] == ["gravel"]
    assert len(list((out / "gravel" / "test").rglob("*.png"))) == 2
