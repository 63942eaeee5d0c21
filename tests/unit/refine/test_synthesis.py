"""Pseudo-anomaly synthesis (paper Sec. 3.2, Table 5): binary, seeded masks; DRAEM blend; CutPaste."""

import numpy as np
import pytest

from anorefiner.refine.perlin import perlin_mask, perlin_noise
from anorefiner.refine.synthesis import SynthesisConfig, synthesize
from anorefiner.seeding import rng


def _images(n=3, size=48):
    gen = np.random.default_rng(1)
    return [gen.integers(60, 200, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


def _textures():
    gen = np.random.default_rng(2)
    return [gen.integers(0, 255, size=(40, 56, 3), dtype=np.uint8) for _ in range(4)]


@pytest.mark.parametrize("shape", [(64, 64), (50, 37)])
def test_perlin_masks_are_binary_nonempty_and_seeded(shape):
    a = perlin_mask(shape, rng(0, "m"))
    b = perlin_mask(shape, rng(0, "m"))
    c = perlin_mask(shape, rng(1, "m"))
    assert a.dtype == bool and a.shape == shape and a.any() and not a.all()
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_perlin_noise_range():
    noise = perlin_noise((64, 64), (4, 8), rng(0))
    assert noise.shape == (64, 64) and np.abs(noise).max() < 1.0 and noise.std() > 0.05


@pytest.mark.parametrize("method", ["perlin_dtd", "cutpaste"])
def test_synthesis_is_binary_seeded_and_local(method):
    imgs = _images()
    cfg = SynthesisConfig(method=method)
    out, masks, sources = synthesize(imgs, 2, cfg, _textures(), seed=3, stream=(0,))
    assert len(out) == 6 and masks.shape == (6, 48, 48) and masks.dtype == bool
    assert list(sources) == [0, 0, 1, 1, 2, 2]
    for img, mask, src in zip(out, masks, sources):
        assert img.dtype == np.uint8 and mask.any()
        assert np.array_equal(img[~mask], imgs[src][~mask])  # untouched outside the mask
        assert not np.array_equal(img[mask], imgs[src][mask])
    again, masks2, _ = synthesize(imgs, 2, cfg, _textures(), seed=3, stream=(0,))
    assert np.array_equal(masks, masks2) and all(np.array_equal(a, b) for a, b in zip(out, again))
    _, masks3, _ = synthesize(imgs, 2, cfg, _textures(), seed=3, stream=(1,))
    assert not np.array_equal(masks, masks3)


def test_cutpaste_mask_is_a_rectangle():
    _, masks, _ = synthesize(_images(), 3, SynthesisConfig(method="cutpaste"), (), seed=0)
    for m in masks:
        ys, xs = np.nonzero(m)
        assert m.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)


def test_blend_follows_draem_formula():
    imgs = [np.full((32, 32, 3), 100, np.uint8)]
    tex = [np.full((32, 32, 3), 200, np.uint8)]
    cfg = SynthesisConfig(n_augment=0)  # texture stays 200: blend = (1-β)·200 + β·100 inside the mask
    out, masks, _ = synthesize(imgs, 4, cfg, tex, seed=0)
    for img, m in zip(out, masks):
        inside = img[m].astype(float)
        assert inside.min() >= 100 + 0.2 * 100 - 1  # β <= 0.8
        assert np.ptp(inside) <= 1


def test_offline_texture_source_works():
    from anorefiner.data.textures import texture_source

    out, masks, _ = synthesize(_images(1), 1, SynthesisConfig(), texture_source("offline", size=32), seed=0)
    assert masks.any()


def test_unknown_methods_and_seas_without_a_model():
    with pytest.raises(ValueError, match="trained SeaS model"):  # textures are no SeaS model
        synthesize(_images(), 1, SynthesisConfig(method="seas"), _textures(), seed=0)
    with pytest.raises(ValueError, match="synthesis.method"):
        synthesize(_images(), 1, SynthesisConfig(method="dream"), _textures(), seed=0)
