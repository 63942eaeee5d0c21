"""Offline texture source (scikit-image's shipped images) and the DTD folder source."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anorefiner.data.textures import (
    OFFLINE_COLOUR,
    OFFLINE_GREY,
    dtd_images,
    load_texture,
    offline_textures,
    texture_source,
)


def test_offline_textures_load_without_network_and_are_seeded():
    a = offline_textures(size=32, seed=0)
    assert len(a) == len(OFFLINE_GREY) + len(OFFLINE_COLOUR) >= 10
    for t in a:
        assert t.shape == (32, 32, 3) and t.dtype == np.uint8
        assert t.std() > 3  # not a flat image
    b = offline_textures(size=32, seed=0)
    c = offline_textures(size=32, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sum(not np.array_equal(x, y) for x, y in zip(a, c)) >= len(a) - 1


def test_more_crops_per_image_extend_the_single_crop_set():
    one = offline_textures(size=32, seed=0)
    three = offline_textures(size=32, seed=0, crops=3)
    assert len(three) == 3 * len(one)
    assert all(np.array_equal(one[i], three[3 * i]) for i in range(len(one)))  # crop 1 unchanged
    assert not np.array_equal(three[0], three[1])
    with pytest.raises(ValueError, match="crops"):
        offline_textures(size=32, crops=0)


def test_excluded_images_are_left_out_and_the_rest_unchanged():
    names = list(OFFLINE_GREY + OFFLINE_COLOUR)
    every = offline_textures(size=32, seed=0)
    kept = texture_source("offline", size=32, seed=0, exclude=("grass", "brick", "not_an_image"))
    assert len(kept) == len(names) - 2
    expected = [t for n, t in zip(names, every) if n not in ("grass", "brick")]
    assert all(np.array_equal(x, y) for x, y in zip(kept, expected))


def test_grey_sources_are_colourised():
    brick = offline_textures(size=32, seed=0)[OFFLINE_GREY.index("brick")]
    assert not (np.array_equal(brick[..., 0], brick[..., 1]) and np.array_equal(brick[..., 1], brick[..., 2]))


def _fake_dtd(root):
    for cls, n in (("banded", 2), ("zigzagged", 1)):
        for i in range(n):
            p = root / "dtd" / "images" / cls / f"{cls}_{i:04d}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((40, 50, 3), 30 * (i + 1), np.uint8)).save(p)
    (root / "dtd" / "images" / "banded" / "notes.txt").write_text("not an image")
    return root


def test_dtd_source_lists_images(tmp_path):
    _fake_dtd(tmp_path)
    paths = texture_source("dtd", tmp_path)
    assert [p.name for p in paths] == ["banded_0000.jpg", "banded_0001.jpg", "zigzagged_0000.jpg"]
    assert dtd_images(tmp_path / "dtd") == paths  # the extracted folder itself also works
    tex = load_texture(paths[0], 16)
    assert tex.shape == (16, 16, 3) and tex.dtype == np.uint8


def test_texture_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_dtd"):
        texture_source("dtd", tmp_path / "no_dtd")
    (tmp_path / "empty" / "images" / "banded").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no DTD images"):
        texture_source("dtd", tmp_path / "empty")
    with pytest.raises(ValueError, match="needs dtd_root"):
        texture_source("dtd")
    with pytest.raises(ValueError, match="'imagenet'"):
        texture_source("imagenet")


def test_load_texture_from_array():
    arrays = texture_source("offline", size=24, seed=2)
    out = load_texture(arrays[0], (10, 12))
    assert out.shape == (10, 12, 3)
    assert load_texture(arrays[0], 24) is arrays[0]
    with pytest.raises(ValueError, match="uint8"):
        load_texture(np.zeros((4, 4), np.float32), 8)
