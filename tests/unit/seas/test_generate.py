"""Generation with a trained (tiny) SeaS model: PGT's synthesis source, its masks and its seeding."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from anorefiner.refine.synthesis import SynthesisConfig, synthesize
from anorefiner.seas.generate import SeaSGenerator


@pytest.fixture(scope="module")
def generator(seas_model):
    return SeaSGenerator(seas_model)


def _normals(n=2, size=48):
    gen = np.random.default_rng(0)
    return [gen.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_generates_images_and_masks_of_the_pseudo_normal_size(generator):
    images, masks, sources = generator.generate(_normals(), 3, seed=0, stream=(0,))
    assert len(images) == 6 and all(im.shape == (48, 48, 3) and im.dtype == np.uint8 for im in images)
    assert masks.shape == (6, 48, 48) and masks.dtype == bool
    assert sources.tolist() == [0, 0, 0, 1, 1, 1]


def test_same_seed_same_anomalies_whatever_the_batch(generator, seas_model):
    a = generator.generate(_normals(), 2, seed=3, stream=(1,))
    b = generator.generate(_normals(), 2, seed=3, stream=(1,))
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0])) and np.array_equal(a[1], b[1])
    one_by_one = SeaSGenerator(seas_model)
    one_by_one.config.generation_batch_size = 1  # each image draws from its own generator
    c = one_by_one.generate(_normals(), 2, seed=3, stream=(1,))
    assert all(np.abs(x.astype(int) - y.astype(int)).max() <= 1 for x, y in zip(a[0], c[0]))
    other = generator.generate(_normals(), 2, seed=3, stream=(2,))
    assert not all(np.array_equal(x, y) for x, y in zip(a[0], other[0]))


def test_masks_come_from_the_mask_head_above_its_threshold(generator, monkeypatch):
    """The mask is the mean RMP probability of the last ``mask_steps`` steps above ``mask_threshold``."""
    calls = []
    original = generator.rmp.forward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out[:, 1].detach().clone())
        return out

    monkeypatch.setattr(generator.rmp, "forward", spy)
    _, masks = generator.denoise(_normals(1, 32), [0], [7])
    assert len(calls) == generator.config.mask_steps
    mean = sum(calls) / len(calls)
    assert np.array_equal(masks[0] > 127, (mean[0] > generator.config.mask_threshold).numpy())


def test_pgt_synthesis_dispatches_to_the_seas_model(generator):
    images, masks, sources = synthesize(_normals(), 2, SynthesisConfig(method="seas"), generator, seed=5, stream=(0,))
    direct = generator.generate(_normals(), 2, seed=5, stream=(0,))
    assert all(np.array_equal(x, y) for x, y in zip(images, direct[0])) and np.array_equal(masks, direct[1])


def test_a_model_needs_its_manifest_and_matching_base(seas_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        SeaSGenerator(tmp_path)
    broken = tmp_path / "model"
    shutil.copytree(seas_model, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["format"] = "other/1"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format"):
        SeaSGenerator(broken)
