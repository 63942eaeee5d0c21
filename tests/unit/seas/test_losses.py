"""SeaS's formulas against independent float64 loops (the official code's arithmetic, element by element)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anorefiner.seas.losses import add_more_noise, alpha_bar_last, da_loss, focal_loss, minmax, pooled_masks


def _loop_minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = math.inf, -math.inf
    for v in x.ravel():
        lo, hi = min(lo, v), max(hi, v)
    out = np.empty_like(x, dtype=np.float64)
    for i, v in np.ndenumerate(x):
        out[i] = (v - lo) / (hi - lo)
    return out


def _loop_da(maps: dict, normal_pos, anomaly_pos, masks: dict, small: bool) -> float:
    """seas.py L459-L479: per resolution, normalised maps, MSE to the mask, MSE of the normal map to 1 − M on the
    anomalous pixels."""
    total = 0.0
    for f, m in maps.items():
        b, h, w, _ = m.shape
        normal = np.zeros((b, h, w))
        anomaly = np.zeros((b, h, w))
        for i in range(b):
            n_idx = [k for k in range(m.shape[3]) if normal_pos[i, k]]
            a_idx = [k for k in range(m.shape[3]) if anomaly_pos[i, k]]
            for y in range(h):
                for x in range(w):
                    normal[i, y, x] = sum(m[i, y, x, k] for k in n_idx) / len(n_idx)
                    anomaly[i, y, x] = sum(m[i, y, x, k] for k in a_idx) / len(a_idx)
        normal, anomaly = _loop_minmax(normal), _loop_minmax(anomaly)
        gt = masks[f][:, 0]
        sq, count, sel_sq, sel_count = 0.0, 0, 0.0, 0
        for i, y, x in np.ndindex(b, h, w):
            sq += (anomaly[i, y, x] - gt[i, y, x]) ** 2
            count += 1
            if (gt[i, y, x] > 0) if small else (gt[i, y, x] == 1):
                sel_sq += (normal[i, y, x] - (1 - gt[i, y, x])) ** 2
                sel_count += 1
        total += sq / count + (sel_sq / sel_count if sel_count else 0.0)
    return total


def _loop_maxpool(gt: np.ndarray, f: int) -> np.ndarray:
    b, c, h, w = gt.shape
    out = np.zeros((b, c, h // f, w // f))
    for i, j, y, x in np.ndindex(*out.shape):
        out[i, j, y, x] = max(gt[i, j, y * f + dy, x * f + dx] for dy in range(f) for dx in range(f))
    return out


@pytest.mark.parametrize("small", [False, True])
def test_da_loss_matches_a_float64_loop(small):
    gen = np.random.default_rng(0)
    b, tokens = 2, 8
    # prompt "<bos> a ob1 with sks1 sks2 sks3 sks4": normal token at 2, anomaly tokens at 4..7 (seas.py L92-L93)
    normal_pos = np.zeros((b, tokens), bool)
    normal_pos[:, 2] = True
    anomaly_pos = np.zeros((b, tokens), bool)
    anomaly_pos[:, 4:8] = True
    mask = np.zeros((b, 1, 16, 16))
    mask[0, 0, 2:9, 3:12] = 1.0
    mask[1, 0, 10:14, 5:7] = 0.6  # fractional values, as a bilinear resize leaves them
    mask[1, 0, 11:13, 5:6] = 1.0
    pooled = {f: m.double().numpy() for f, m in pooled_masks(torch.as_tensor(mask), 16, (2, 4)).items()}
    maps = {f: gen.random((b, 16 // f, 16 // f, tokens)) for f in (2, 4)}
    got = da_loss({f: torch.as_tensor(m) for f, m in maps.items()}, torch.as_tensor(normal_pos),
                  torch.as_tensor(anomaly_pos), {f: torch.as_tensor(m) for f, m in pooled.items()}, small)
    assert float(got) == pytest.approx(_loop_da(maps, normal_pos, anomaly_pos, pooled, small), rel=1e-5)


def test_pooled_masks_max_pool_the_latent_mask():
    import torch.nn.functional as F

    mask = torch.as_tensor(np.random.default_rng(1).random((2, 1, 32, 32)) > 0.8, dtype=torch.float64)
    latent = F.interpolate(mask, size=(16, 16), mode="bilinear", align_corners=False).numpy()
    got = pooled_masks(mask, 16, (1, 2, 4))
    np.testing.assert_allclose(got[1].numpy(), latent)
    for f in (2, 4):  # two 2x2 pools (the official 64 -> 32 -> 16) equal one f x f pool
        np.testing.assert_allclose(got[f].numpy(), _loop_maxpool(latent, f))


def test_da_loss_without_anomalous_pixels_adds_nothing_for_the_normal_token():
    maps = {2: torch.rand(1, 4, 4, 3, dtype=torch.float64)}
    pos = torch.tensor([[False, True, False]])
    neg = torch.tensor([[False, False, True]])
    zero = {2: torch.zeros(1, 1, 4, 4, dtype=torch.float64)}
    anomaly = minmax(maps[2][..., 2])
    assert float(da_loss(maps, pos, neg, zero)) == pytest.approx(float((anomaly ** 2).mean()))


def test_minmax_matches_a_loop():
    x = np.random.default_rng(2).normal(size=(3, 5, 4))
    np.testing.assert_allclose(minmax(torch.as_tensor(x)).numpy(), _loop_minmax(x), rtol=1e-12)


def _loop_focal(probs: np.ndarray, target: np.ndarray, gamma=2.0, smooth=1e-5) -> float:
    """_focal_loss.py L34-L88 with alpha = 1: one-hot of int(target) clamped to [smooth, 1 − smooth]."""
    b, c, h, w = probs.shape
    total, n = 0.0, 0
    for i, y, x in np.ndindex(b, h, w):
        cls = int(target[i, 0, y, x])
        pt = smooth
        for k in range(c):
            onehot = 1.0 if k == cls else 0.0
            onehot = min(max(onehot, smooth / (c - 1)), 1.0 - smooth)
            pt += onehot * probs[i, k, y, x]
        total += -((1 - pt) ** gamma) * math.log(pt)
        n += 1
    return total / n


def test_focal_loss_matches_a_float64_loop():
    gen = np.random.default_rng(3)
    logits = gen.normal(size=(2, 2, 6, 5))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    target = gen.choice([0.0, 0.4, 1.0], size=(2, 1, 6, 5))  # 0.4 counts as class 0 (cast to int)
    got = focal_loss(torch.as_tensor(probs), torch.as_tensor(target))
    assert float(got) == pytest.approx(_loop_focal(probs, target), rel=1e-6)


def test_add_more_noise_matches_a_float64_loop():
    steps, b0, b1 = 1500, 0.00085, 0.012
    alpha_bar = 1.0
    for i in range(steps):  # betas = linspace(sqrt(b0), sqrt(b1), steps) ** 2
        beta = (math.sqrt(b0) + (math.sqrt(b1) - math.sqrt(b0)) * i / (steps - 1)) ** 2
        alpha_bar *= 1.0 - beta
    assert alpha_bar_last(steps, b0, b1) == pytest.approx(alpha_bar, rel=1e-10)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    e = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    expected = math.sqrt(alpha_bar) * x + math.sqrt(1 - alpha_bar) * e
    torch.testing.assert_close(add_more_noise(x, e, steps, b0, b1), expected)
    # 1500 steps leave ~1.6 % of the reference image's latent (the official "more noise" than t = 1000)
    assert math.sqrt(alpha_bar) == pytest.approx(0.016, abs=0.004)
