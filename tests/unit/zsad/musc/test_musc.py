"""MuSc against a slow, loop-by-loop reading of methods.md (written independently of zsad.musc.backend)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anorefiner.cache import Features
from anorefiner.zsad import get_backend
from anorefiner.zsad.musc import backend as musc
from anorefiner.zsad.groups import make_groups


def slow_lnamd(x: np.ndarray, r: int, l2: bool) -> np.ndarray:
    """x [h, w, C] of one image: LayerNorm over all of [C,H,W], r x r mean with zeros counted."""
    x = x.astype(np.float64)
    y = (x - x.mean()) / np.sqrt(x.var() + 1e-5)
    h, w, c = y.shape
    p = (r - 1) // 2
    out = np.zeros_like(y)
    for i in range(h):
        for j in range(w):
            acc = np.zeros(c)
            for di in range(-p, p + 1):
                for dj in range(-p, p + 1):
                    if 0 <= i + di < h and 0 <= j + dj < w:
                        acc += y[i + di, j + dj]
            out[i, j] = acc / (r * r)
            if l2:
                out[i, j] /= np.linalg.norm(out[i, j])
    return out


def slow_msm(z: np.ndarray, topmin: float) -> np.ndarray:
    """z [N, L, C]; returns [N, L]."""
    n, L, _ = z.shape
    k = max(1, int((n - 1) * topmin))
    out = np.zeros((n, L))
    for i in range(n):
        for p in range(L):
            per_image = []
            for j in range(n):
                if j == i:
                    continue
                per_image.append(min(np.linalg.norm(z[i, p] - z[j, q]) for q in range(L)))
            out[i, p] = np.mean(sorted(per_image)[:k])
    return out


def slow_score(tokens: dict, r_list, topmin, l2) -> np.ndarray:
    maps = []
    for r in r_list:
        per_layer = []
        for x in tokens.values():
            n, h, w, c = x.shape
            z = np.stack([slow_lnamd(x[i], r, l2) for i in range(n)]).reshape(n, h * w, c)
            per_layer.append(slow_msm(z, topmin).reshape(n, h, w))
        maps.append(np.mean(per_layer, 0))
    return np.mean(maps, 0)


def _tokens(n=6, g=5, c=8, layers=("6", "12"), seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=(n, g, g, c)).astype(np.float32) * (1 + i) for i, name in enumerate(layers)}


@pytest.mark.parametrize("l2", [True, False])
def test_score_matches_slow_reference(l2):
    tokens = _tokens()
    fast = musc.score({k: torch.from_numpy(v) for k, v in tokens.items()}, (1, 3, 5), 0.3, l2_normalize=l2)
    slow = slow_score(tokens, (1, 3, 5), 0.3, l2)
    assert fast.shape == (6, 5, 5)
    np.testing.assert_allclose(fast.numpy(), slow, atol=1e-5, rtol=1e-5)


def test_chunking_does_not_change_result():
    tokens = {k: torch.from_numpy(v) for k, v in _tokens(n=7).items()}
    big = musc.score(tokens)
    tiny = musc.score(tokens, chunk=30)  # forces 1x1 image blocks
    np.testing.assert_allclose(big.numpy(), tiny.numpy(), atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 25 * 25 * 2, 25 * 25 * 9, 2**25])  # blocks of 1, 1, 3 and all 7 images
def test_symmetric_pairwise_blocks_match_one_sided_distances(chunk):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(7, 25, 16, generator=g)
    both = musc.pairwise_min_dist(z, chunk)
    one_sided = musc.min_dist_to_images(z, z, 2**25)
    assert both.shape == (7, 25, 7)
    torch.testing.assert_close(both, one_sided, atol=1e-5, rtol=1e-5)


def test_small_sets_use_documented_fallback_and_single_image_fails():
    tokens = _tokens(n=3)
    fast = musc.score({k: torch.from_numpy(v) for k, v in tokens.items()}, (1,), 0.3)
    np.testing.assert_allclose(fast.numpy(), slow_score(tokens, (1,), 0.3, True), atol=1e-5)  # k = 1
    with pytest.raises(ValueError, match="at least one reference"):
        musc.score({k: torch.from_numpy(v[:1]) for k, v in tokens.items()})


def test_make_groups_is_ceil_array_split():
    groups = make_groups(83, 30)
    assert [len(g) for g in groups] == [28, 28, 27]
    assert np.concatenate(groups).tolist() == list(range(83))
    assert [len(g) for g in make_groups(42, 30)] == [21, 21]
    assert len(make_groups(12, None)) == 1 and len(make_groups(31, 30)) == 2
    shuffled = make_groups(83, 30, seed=3)
    assert sorted(np.concatenate(shuffled).tolist()) == list(range(83))
    assert [g.tolist() for g in shuffled] == [g.tolist() for g in make_groups(83, 30, seed=3)]
    assert np.concatenate(shuffled).tolist() != list(range(83))
    with pytest.raises(ValueError, match="group_size"):
        make_groups(10, 0)


def test_grouped_backend_scores_each_group_alone():
    tokens = _tokens(n=11, g=4)
    feats = Features(ids=[f"test/good/{i:03d}" for i in range(11)], layers=tokens, cls=None)
    res = get_backend("musc_star", {"group_size": 5, "r_list": [1, 3]}, seed=3).coarse(feats)
    # Default group order: a permutation seeded like PGT's groups (same seed, same groups).
    for g in make_groups(11, 5, seed=3):
        alone = musc.score({k: torch.from_numpy(v[g]) for k, v in tokens.items()}, (1, 3))
        np.testing.assert_allclose(res.maps[g], alone.numpy(), atol=1e-6)
    np.testing.assert_allclose(res.scores, res.maps.reshape(11, -1).max(1), atol=1e-6)  # no CLS: no RsCIN


def test_score_queries_consistent_with_mutual_scoring():
    tokens = _tokens(n=6)
    t = {k: torch.from_numpy(v) for k, v in tokens.items()}
    full = musc.score(t)
    # queries identical to images 2 and 4, each excluded from its own references = MSM of that image
    q = {k: v[[2, 4]] for k, v in t.items()}
    got = musc.score_queries(q, t, exclude=[2, 4])
    np.testing.assert_allclose(got.numpy(), full[[2, 4]].numpy(), atol=1e-5)
    # without exclusion the identical image is a zero-distance reference: scores drop
    assert (musc.score_queries(q, t, exclude=[None, None]) < got + 1e-6).all()
    feats = Features(ids=[str(i) for i in range(6)], layers=tokens, cls=None)
    backend = get_backend("musc", {})
    via_backend = backend.score_queries({k: v[[2, 4]] for k, v in tokens.items()}, None, feats, list(range(6)), [2, 4])
    np.testing.assert_allclose(via_backend.numpy(), full[[2, 4]].numpy(), atol=1e-5)


def test_rscin_tiny_case():
    from anorefiner.zsad.musc.rscin import rscin

    scores = np.array([0.0, 1.0, 0.5, 0.9])
    cls = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)  # pairs {0,1}, {2,3}
    # k = 1: every image keeps its own (min-max normalised) score
    np.testing.assert_allclose(rscin(scores * 2 + 1, cls, [1]), scores, atol=1e-6)
    # k = 2: each image averaged with its nearest neighbour, weighted by cosine similarity
    c = cls / np.linalg.norm(cls, axis=1, keepdims=True)
    w = c @ c.T
    s = (scores - scores.min()) / (scores.max() - scores.min())
    expected = [(w[0, 0] * s[0] + w[0, 1] * s[1]) / (w[0, 0] + w[0, 1]),
                (w[1, 1] * s[1] + w[1, 0] * s[0]) / (w[1, 1] + w[1, 0]),
                (w[2, 2] * s[2] + w[2, 3] * s[3]) / (w[2, 2] + w[2, 3]),
                (w[3, 3] * s[3] + w[3, 2] * s[2]) / (w[3, 3] + w[3, 2])]
    got = rscin(scores, cls, [2])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(rscin(scores, cls, [1, 2]), (rscin(scores, cls, [1]) + got) / 2, atol=1e-6)
    np.testing.assert_allclose(rscin(scores, None, [1, 2]), scores, atol=1e-7)  # CNN: off


def test_backend_applies_rscin_with_dataset_k_list():
    tokens = _tokens(n=8, g=4)
    cls = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
    feats = Features(ids=[str(i) for i in range(8)], layers=tokens, cls=cls)
    from anorefiner.zsad.musc.rscin import rscin

    b = get_backend("musc", {"dataset": "visa", "r_list": [1]})
    assert b.k_list() == (1, 8, 9)
    res = b.coarse(feats)
    np.testing.assert_allclose(res.scores, rscin(res.maps.reshape(8, -1).max(1), cls, [1, 8, 9]), atol=1e-6)
    cnn = get_backend("musc_cnn", {"r_list": [1]}).coarse(feats)
    np.testing.assert_allclose(cnn.scores, res.maps.reshape(8, -1).max(1), atol=1e-6)


def test_unknown_option_is_named():
    from anorefiner.config import ConfigError

    with pytest.raises(ConfigError, match="topmn"):
        get_backend("musc", {"topmn": 0.2})
    with pytest.raises(ValueError, match="april_gan"):
        get_backend("april_gan", {})


def test_reference_indices_are_the_groups_the_backend_scored_against():
    """PGT scores a pseudo-anomaly against the images its source image was scored against (issue 26)."""
    from anorefiner.zsad import get_backend

    whole = get_backend("musc", {"device": "cpu"}, seed=3)
    assert np.array_equal(whole.reference_indices(100, [7, 42]), np.arange(100))
    star = get_backend("musc_star", {"device": "cpu"}, seed=3)
    groups = star.groups(100)
    g7 = next(g for g in groups if 7 in g)
    assert np.array_equal(star.reference_indices(100, [7]), np.sort(g7))
    g42 = next(g for g in groups if 42 in g)
    both = star.reference_indices(100, [7, 42])
    assert set(both.tolist()) == set(g7.tolist()) | set(g42.tolist())
    assert np.array_equal(get_backend("paclip", {}).reference_indices(5, [1]), np.arange(5))


@pytest.mark.parametrize("resize, warns", [("bicubic antialias (24, 24)->(37, 37), class position kept", True),
                                           ("bicubic_no_antialias (24, 24)->(37, 37), class position kept", False),
                                           (None, False)])
def test_coarse_says_when_the_features_are_not_resized_as_musc_official(resize, warns, caplog):
    """MuSc's vendored open_clip resizes without antialias: a cache resized otherwise is scored, with a warning."""
    import logging

    attrs = {"pos_embed": resize} if resize else {}
    feats = Features(ids=[str(i) for i in range(4)], layers=_tokens(n=4, g=3), cls=None, attrs=attrs)
    with caplog.at_level(logging.WARNING, logger="anorefiner"):
        get_backend("musc", {"r_list": [1], "rscin": False}).coarse(feats)
    assert ("MuSc's official code uses 'bicubic_no_antialias'" in caplog.text) == warns

