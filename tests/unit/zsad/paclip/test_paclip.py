"""PA-CLIP end to end on small features: random tokens, and real EfficientNet-Lite0 / random-weight
CLIP features of the demo dataset (text-tower and image-level augmentation paths)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anorefiner.cache import Features
from anorefiner.zsad import get_backend
from anorefiner.zsad.paclip.coreset import greedy_coreset
from anorefiner.zsad.paclip.backend import PACLIPBackend, PACLIPConfig, cada_sigma, object_positions

SMALL = {"r_list": [1, 3], "coreset_ratio_full": 0.5, "coreset_ratio_normal": 0.5}


def _feats(n=10, g=5, c=12, seed=0):
    rng = np.random.default_rng(seed)
    layers = {name: rng.normal(size=(n, g, g, c)).astype(np.float32) for name in ("a", "b")}
    return Features(ids=[f"test/good/{i:03d}" for i in range(n)], layers=layers, cls=None)


def test_end_to_end_random_features_deterministic():
    feats = _feats()
    b1 = get_backend("paclip", {**SMALL, "category": "x"}, seed=3)
    r1 = b1.coarse(feats)
    r2 = get_backend("paclip", {**SMALL, "category": "x"}, seed=3).coarse(feats)
    assert r1.maps.shape == (10, 5, 5) and r1.scores.shape == (10,)
    assert np.isfinite(r1.maps).all()
    np.testing.assert_array_equal(r1.maps, r2.maps)
    np.testing.assert_allclose(r1.scores, r1.maps.reshape(10, -1).mean(1), rtol=1e-6)  # paper: mean
    assert len(b1.last_info["normal_images"]) == 2  # max(min_normal_images, 10% of 10)


def test_alpha_zero_is_full_bank_response_and_subtraction_lowers():
    feats = _feats()
    plain = get_backend("paclip", {**SMALL, "alpha": 0.0}).coarse(feats).maps
    sub = get_backend("paclip", {**SMALL, "alpha": 1.0}).coarse(feats).maps
    assert (sub <= plain + 1e-6).all() and (sub < plain - 1e-6).any()
    # Eq. 7's protection: with tau at the maximum every patch is suppressed, at the minimum ~none
    none = get_backend("paclip", {**SMALL, "alpha": 1.0, "tau_quantile": 0.0}).coarse(feats).maps
    assert (none >= sub - 1e-6).all()


def test_query_own_patches_are_excluded():
    feats = _feats()
    b = get_backend("paclip", {**SMALL, "coreset_ratio_full": 1.0, "coreset_ratio_normal": 1.0})
    q = {k: v[[4]] for k, v in feats.layers.items()}
    kept = b.score_queries(q, None, feats, list(range(10)), [None])
    excluded = b.score_queries(q, None, feats, list(range(10)), [4])
    # image 4 itself is in the full bank: without exclusion one reference is at distance 0
    assert (kept.numpy() < excluded.numpy()).mean() > 0.9


def test_coreset_is_seeded_and_farthest_first():
    x = torch.tensor([[0.0], [0.1], [10.0], [10.1], [5.0]])
    idx = greedy_coreset(x, 0.6, seed=0, proj_dim=128)
    assert len(idx) == 3 and idx.tolist() == greedy_coreset(x, 0.6, seed=0).tolist()
    chosen = set(idx.tolist())
    assert 4 in chosen and len(chosen & {0, 1}) == 1 and len(chosen & {2, 3}) == 1
    assert greedy_coreset(x, 1.0, seed=0).tolist() == [0, 1, 2, 3, 4]


def test_cada_sigma_definitions():
    still = np.tile([[0.5, 0.5]], (6, 1))
    assert cada_sigma(still)[0] == 0.0
    alternating = np.array([[0.4, 0.5], [0.6, 0.5]] * 3)
    sigma, s_spatial, s_temporal = cada_sigma(alternating)
    assert s_spatial == pytest.approx(0.1) and s_temporal == pytest.approx(0.2 / np.sqrt(2))
    assert sigma == pytest.approx(np.hypot(0.1, 0.2 / np.sqrt(2)))
    # a bright object moved to the right half is found there
    tokens = np.zeros((2, 8, 8, 4), dtype=np.float32)
    tokens[..., 0] = np.random.default_rng(0).normal(0, 0.01, size=(2, 8, 8))
    tokens[0, 3:5, 1:3, 1] = 5.0
    tokens[1, 3:5, 5:7, 1] = 5.0
    pos = object_positions(tokens)
    assert pos[0, 1] < 0.5 < pos[1, 1] and abs(pos[0, 0] - 0.5) < 0.1


@pytest.fixture(scope="module")
def demo_features(demo_dataset):
    from anorefiner.backbones import build_backbone
    from anorefiner.cache import extract_features, read_features
    from anorefiner.data.index import index_category

    root = demo_dataset
    df = index_category(root, "widget", dataset="demo", split="test")
    bb = build_backbone("efficientnet_lite0", resolution=64)
    out = root.parent / "widget_effnet.h5"
    extract_features(df, bb, out, batch_size=12)
    return read_features(out), bb, df


def test_demo_effnet_with_image_level_cada(demo_features):
    from anorefiner.data.index import load_image

    feats, bb, df = demo_features
    paths = dict(zip(df["image_id"], df["image_path"]))
    one = {**SMALL, "r_list": (1,), "layers": (next(iter(feats.layers)),)}
    b = PACLIPBackend(PACLIPConfig(**one, sigma_threshold=1.0), backbone=bb, seed=0,
                      images=lambda idx: [load_image(paths[feats.ids[i]]) for i in idx])
    res = b.coarse(feats)
    assert res.maps.shape == (len(feats.ids),) + feats.layers[next(iter(feats.layers))].shape[1:3]
    assert np.isfinite(res.maps).all()
    assert b.last_info["n_views"] == 2 * (1 + 4)  # 2 normal images x (original + 4 geometric views)
    assert b.selection_mode(feats) == "visual"  # EfficientNet has no text tower


@pytest.mark.slow  # builds a random-weight ViT-B-32 with its text tower (~30 s on 2 cores)
def test_text_selection_with_clip_text_tower(demo_dataset):
    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import index_category, load_image

    bb = build_backbone("ViT-B-32", resolution=64, pretrained=None, seed=0)  # random weights, offline
    df = index_category(demo_dataset, "widget", dataset="demo", split="test")
    layers, cls = bb.forward(bb.preprocess([load_image(p) for p in df["image_path"]]))
    feats = Features(ids=list(df["image_id"]), layers={k: v.numpy() for k, v in layers.items()}, cls=cls.numpy())
    one = {**SMALL, "r_list": [1], "layers": [next(iter(feats.layers))]}
    b = get_backend("paclip", {**one, "category": "widget"}, backbone=bb)
    assert b.selection_mode(feats) == "text"
    idx = np.arange(len(feats.ids))
    scores = b.normal_scores(feats, idx)
    text = bb.encode_text(["a photo of normal widget", "a photo of defective widget"])
    img = bb.image_embedding(torch.as_tensor(feats.cls))
    expected = torch.softmax(img @ text.T / 0.01, 1)[:, 0].numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)
    res = b.coarse(feats)  # CADA on the token grid here (no image source)
    assert sorted(b.last_info["normal_images"]) == sorted(np.argsort(-expected, kind="stable")[:2].tolist())
    assert np.isfinite(res.maps).all()


def test_ablation_switches_match_their_definitions():
    """Tables 3-4: +PAD (no CADA, one scale), +PAD+PAM (one scale), +PAD+MPAM (all); pad=False = S_c alone."""
    feats = _feats()
    full = get_backend("paclip", {**SMALL, "alpha": 0.0}).coarse(feats).maps  # Eq. 7 with alpha 0 = S_c
    no_pad = get_backend("paclip", {**SMALL, "pad": False}).coarse(feats).maps
    np.testing.assert_allclose(no_pad, full, rtol=1e-6, atol=1e-7)
    one_scale = get_backend("paclip", {**SMALL, "mpam": False}).coarse(feats).maps
    r1_only = get_backend("paclip", {**SMALL, "r_list": [1]}).coarse(feats).maps
    np.testing.assert_allclose(one_scale, r1_only, rtol=1e-6)
    geometric = {**SMALL, "mpam": False, "sigma_threshold": 1.0}  # CADA: token-grid flips/rotations
    with_pam = get_backend("paclip", geometric)
    pam_maps = with_pam.coarse(feats).maps
    assert with_pam.last_info["n_views"] == 5 * len(with_pam.last_info["normal_images"])
    b = get_backend("paclip", {**geometric, "pam": False})
    pad_only = b.coarse(feats).maps
    assert b.last_info["n_views"] == len(b.last_info["normal_images"])  # no augmented views
    assert b.last_info["r_list"] == [1] and not b.last_info["pam"]
    assert not np.allclose(pad_only, pam_maps)  # CADA views change the normal bank
    with pytest.raises(Exception, match="padd"):
        get_backend("paclip", {**SMALL, "padd": False})
