"""PA-CLIP's PAD+PAM on top of AnomalyCLIP/AdaCLIP: the fusion against float64 loops, option errors, and the
backend end to end on the tiny CLIP with a trained AnomalyCLIP prompt learner."""

from __future__ import annotations

import numpy as np
import pytest

from anorefiner.config import ConfigError
from anorefiner.zsad.pad_pam.backend import PadPamBackend, PadPamConfig, fuse, minmax


def _fuse_loops(base, pad, w):
    base, pad = np.asarray(base, np.float64), np.asarray(pad, np.float64)
    lo_b, hi_b, lo_p, hi_p = base.min(), base.max(), pad.min(), pad.max()
    out = np.zeros(base.shape)
    for i in np.ndindex(base.shape):
        b = 0.0 if hi_b <= lo_b else (base[i] - lo_b) / (hi_b - lo_b)
        p = 0.0 if hi_p <= lo_p else (pad[i] - lo_p) / (hi_p - lo_p)
        out[i] = w * b + (1 - w) * p
    return out


@pytest.mark.parametrize("w", [0.0, 0.3, 0.5, 1.0])
def test_fusion_matches_a_loop(w):
    rng = np.random.default_rng(3)
    base, pad = rng.normal(size=(4, 5, 6)), rng.normal(size=(4, 5, 6)) * 7 + 2
    np.testing.assert_allclose(fuse(base, pad, w), _fuse_loops(base, pad, w), atol=1e-6)


def test_constant_input_maps_to_zero_not_nan():
    assert np.array_equal(minmax(np.full((3, 2), 5.0)), np.zeros((3, 2)))
    assert np.isfinite(fuse(np.ones(4), np.arange(4.0), 0.5)).all()


def test_option_errors_name_the_value():
    with pytest.raises(ValueError, match="base_type must be one of"):
        PadPamBackend(PadPamConfig(base_type="musc"))
    with pytest.raises(ValueError, match="base_weight must lie in"):
        PadPamBackend(PadPamConfig(base_type="anomalyclip", base_weight=2.0))


def test_unknown_base_option_is_a_config_error():
    with pytest.raises(ConfigError, match="base_options.no_such_key"):
        PadPamBackend(PadPamConfig(base_type="anomalyclip", base_options={"no_such_key": 1}))


def test_pad_pam_on_anomalyclip_end_to_end(tiny_clip, demo_dataset, tmp_path):
    """AnomalyCLIP (random prompt learner) + PAD+PAM on 6 demo images: the fused maps are the documented fusion
    of the base's maps and PA-CLIP's PAD maps on the base's features, with normal images chosen by base scores."""
    from types import SimpleNamespace

    import torch

    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import index_category, load_image
    from anorefiner.zsad import get_backend
    from anorefiner.zsad.anomalyclip.backend import CHECKPOINT_KEY, PromptLearner

    tiny = build_backbone(tiny_clip, 56, pretrained=None, seed=0)
    small = {"n_ctx": 3, "depth": 3, "t_n_ctx": 2}
    ck = tmp_path / "p.pt"
    torch.save({CHECKPOINT_KEY: PromptLearner(tiny, **small, seed=1).state_dict()}, ck)
    paths = list(index_category(demo_dataset, "widget", dataset="demo").image_path)[:6]
    images = lambda idx: [load_image(paths[i]) for i in idx]  # noqa: E731
    feats = SimpleNamespace(ids=[f"i{i}" for i in range(6)], layers={}, cls=None)
    base_opts = {"checkpoint": str(ck), "device": "cpu", **small}
    opts = {"base_type": "anomalyclip", "base_options": base_opts, "device": "cpu",
            "paclip": {"n_augment": 2, "coreset_ratio_full": 1.0, "coreset_ratio_normal": 1.0}}
    backend = get_backend("pad_pam", opts, backbone=tiny, seed=0)
    with pytest.raises(ValueError, match="needs --data-root"):
        backend.coarse(feats)
    backend.images = images
    result = backend.coarse(feats)
    assert result.maps.shape == (6, 4, 4) and np.isfinite(result.maps).all() and np.isfinite(result.scores).all()
    info = backend.last_info
    base = get_backend("anomalyclip", base_opts, backbone=tiny)
    base.images = images
    b = base.coarse(feats)
    normal = info["paclip_info"]["normal_images"]
    assert sorted(normal) == sorted(np.argsort(b.scores, kind="stable")[:len(normal)].tolist())
    # base_weight 1 gives back the base map, min-max normalised over the category
    only_base = get_backend("pad_pam", {**opts, "base_weight": 1.0}, backbone=tiny, seed=0)
    only_base.images = images
    np.testing.assert_allclose(only_base.coarse(feats).maps, minmax(b.maps), atol=1e-5)
    # a different seed changes nothing but PA-CLIP's coreset/augmentation draws: same seed, same numbers
    again = get_backend("pad_pam", opts, backbone=tiny, seed=0)
    again.images = images
    np.testing.assert_array_equal(again.coarse(feats).maps, result.maps)
    with pytest.raises(ValueError, match="at least 2 test images"):
        backend.coarse(SimpleNamespace(ids=["a"], layers={}, cls=None))
