"""HDF5 feature cache: exact round trip, resume after a kill, attribute checks, the CLI command."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from anorefiner.backbones import build_backbone
from anorefiner.cache import extract_features, read_attrs, read_features
from anorefiner.data.index import index_category, load_image

RES = 64  # the demo images' size: EfficientNet-Lite0 gives an 8×8 grid


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", RES)


@pytest.fixture(scope="module")
def tiles_index(demo_dataset):
    return index_category(demo_dataset, "tiles", dataset="demo")


class Interrupting:
    """A backbone that raises after ``k`` batches (a killed extraction); counts forward calls."""

    def __init__(self, inner, k=None):
        self.inner, self.k, self.calls = inner, k, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch):
        if self.k is not None and self.calls >= self.k:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self.inner.forward(batch)


def _h5_content(path):
    with h5py.File(path, "r") as f:
        arrays = {}
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return arrays, {k: f.attrs[k] for k in f.attrs}


def _assert_same_file(a, b):
    arrays_a, attrs_a = _h5_content(a)
    arrays_b, attrs_b = _h5_content(b)
    assert attrs_a == attrs_b
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        assert np.array_equal(arrays_a[name], arrays_b[name]), name


def test_demo_features_round_trip_exactly(tmp_path, lite0, tiles_index):
    out = extract_features(tiles_index, lite0, tmp_path / "tiles.h5", batch_size=5,
                           expected_attrs={"dataset": "demo", "category": "tiles"})
    assert out == tmp_path / "tiles.h5" and not (tmp_path / "tiles.h5.partial").exists()
    test = tiles_index[tiles_index["split"] == "test"]
    feats = read_features(out, dtype=None)
    assert feats.ids == list(test["image_id"]) and len(feats.ids) == 12
    assert feats.cls is None and list(feats.layers) == ["blocks.2", "blocks.4"]
    images = [load_image(p) for p in test["image_path"]]
    batches = [lite0.forward(lite0.preprocess(images[a : a + 5]))[0] for a in (0, 5, 10)]  # same batches
    for name, arr in feats.layers.items():
        assert arr.dtype == np.float16 and arr.shape == (12, 8, 8, arr.shape[-1])
        expected = np.concatenate([b[name].numpy() for b in batches]).astype(np.float16)
        assert np.array_equal(arr, expected)
    f32 = read_features(out, layers=["blocks.4"])
    assert list(f32.layers) == ["blocks.4"] and f32.layers["blocks.4"].dtype == np.float32
    attrs = feats.attrs
    assert attrs["dataset"] == "demo" and attrs["category"] == "tiles" and attrs["resolution"] == RES
    assert attrs["backbone"] == "efficientnet_lite0" and attrs["dtype"] == "float16"
    assert attrs["preprocess"]["mean"] == [0.5, 0.5, 0.5] and "torch" in attrs["versions"]
    with h5py.File(out, "r") as f:
        assert f["layers/blocks.2"].chunks == (1, 8, 8, 40)


def test_killed_extraction_resumes_to_an_identical_cache(tmp_path, lite0, tiles_index):
    full = extract_features(tiles_index, lite0, tmp_path / "full.h5", batch_size=4, workers=0)
    out = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        extract_features(tiles_index, Interrupting(lite0, k=2), out, batch_size=4)
    partial = tmp_path / "resumed.h5.partial"
    assert not out.exists() and partial.exists()
    with h5py.File(partial, "r") as f:
        assert f.attrs["n_done"] == 8
    with pytest.raises(FileNotFoundError, match="interrupted"):
        read_features(out)
    counting = Interrupting(lite0)
    extract_features(tiles_index, counting, out, batch_size=4)
    assert counting.calls == 1  # only the last 4 of 12 images were computed again
    _assert_same_file(full, out)


def test_partial_with_other_settings_starts_over(tmp_path, lite0, tiles_index):
    out = tmp_path / "c.h5"
    with pytest.raises(KeyboardInterrupt):
        extract_features(tiles_index, Interrupting(lite0, k=1), out, batch_size=4, dtype="float32")
    counting = Interrupting(lite0)
    extract_features(tiles_index, counting, out, batch_size=4, dtype="float16", compression="lzf")
    assert counting.calls == 3
    full = extract_features(tiles_index, lite0, tmp_path / "full.h5", batch_size=4, compression="lzf")
    _assert_same_file(full, out)


def test_damaged_partial_is_replaced(tmp_path, lite0, tiles_index):
    out = tmp_path / "d.h5"
    (tmp_path / "d.h5.partial").write_bytes(b"not an HDF5 file")
    extract_features(tiles_index, lite0, out, batch_size=4)
    assert len(read_features(out).ids) == 12 and not (tmp_path / "d.h5.partial").exists()


def test_attribute_mismatch_names_the_key(tmp_path, lite0, tiles_index):
    out = extract_features(tiles_index, lite0, tmp_path / "t.h5", expected_attrs={"category": "tiles"})
    read_features(out, expect={"backbone": "efficientnet_lite0", "resolution": RES, "layers": ["blocks.2", "blocks.4"]})
    with pytest.raises(ValueError, match="'resolution' is 64 but the configuration expects 518"):
        read_features(out, expect={"resolution": 518})
    with pytest.raises(ValueError, match="'seed' is missing"):
        read_features(out, expect={"seed": 1})
    with pytest.raises(ValueError, match=r"expected_attrs\['resolution'\]"):
        extract_features(tiles_index, lite0, tmp_path / "u.h5", expected_attrs={"resolution": 518})
    assert read_attrs(out)["category"] == "tiles"


def test_class_tokens_of_a_vit_are_cached(tmp_path, tiles_index):
    vit = build_backbone("ViT-S-16", 32, pretrained=None)
    feats = read_features(extract_features(tiles_index, vit, tmp_path / "v.h5", batch_size=6))
    assert feats.cls.shape == (12, 384) and feats.cls.dtype == np.float32
    assert list(feats.layers) == vit.layers and feats.layers["12"].shape == (12, 2, 2, 384)
    first = tiles_index[tiles_index["split"] == "test"]["image_path"].iloc[0]
    _, cls = vit.forward(vit.preprocess([load_image(first)]))
    np.testing.assert_allclose(feats.cls[0], cls[0].numpy(), rtol=1e-5, atol=1e-5)


def test_bad_index_is_rejected(tmp_path, lite0, tiles_index):
    with pytest.raises(ValueError, match="no test-split rows"):
        extract_features(tiles_index[tiles_index["split"] == "train"], lite0, tmp_path / "x.h5")
    with pytest.raises(ValueError, match="'image_path'"):
        extract_features(tiles_index.drop(columns=["image_path"]), lite0, tmp_path / "x.h5")
    with pytest.raises(ValueError, match="dtype"):
        extract_features(tiles_index, lite0, tmp_path / "x.h5", dtype="int8")


def test_features_command(tmp_path, demo_dataset, lite0, tiles_index):
    from anorefiner.cli import main

    out = tmp_path / "features" / "demo" / f"efficientnet_lite0@{RES}" / "widget.h5"
    rc = main(["features", "--root", str(demo_dataset), "--dataset", "demo", "--category", "widget",
               "--backbone", "efficientnet_lite0", "--resolution", str(RES), "--batch-size", "4",
               "--compression", "gzip", "--device", "cpu", "--pretrained", "imagenet", "--layers",
               "--out", str(out)])
    assert rc == 0
    feats = read_features(out, expect={"dataset": "demo", "category": "widget", "backbone": "efficientnet_lite0"})
    assert len(feats.ids) == 12 and feats.layers["blocks.2"].shape == (12, 8, 8, 40)
    assert feats.attrs["compression"] == "gzip" and feats.attrs["weights"] == lite0.weights


def test_clip_activation_is_recorded_and_checked(tiles_index, tiny_clip, tmp_path):
    """A QuickGELU cache is never read where GELU features are expected (and vice versa)."""
    bb = build_backbone(tiny_clip, 42, pretrained=None, seed=0, activation="quick_gelu")
    path = extract_features(tiles_index.head(3), bb, tmp_path / "q.h5", batch_size=2)
    assert read_attrs(path)["activation"] == "quick_gelu"
    assert read_features(path, expect={"activation": "quick_gelu"}).layers["4"].shape == (3, 3, 3, 64)
    with pytest.raises(ValueError, match="'activation' is 'quick_gelu' but the configuration expects 'gelu'"):
        read_features(path, expect={"activation": "gelu"})
