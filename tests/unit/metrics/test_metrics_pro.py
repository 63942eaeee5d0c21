"""PRO (MuSc and MVTec variants) against slow per-threshold references written here."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import measure

from anorefiner.metrics import component_weights, pro


def regions(masks, connectivity):
    """(image index, bool region) of every ground-truth component, via scikit-image."""
    out = []
    for i, m in enumerate(masks):
        lab = measure.label(m, connectivity=2 if connectivity == 8 else 1)
        out += [(i, lab == c) for c in range(1, lab.max() + 1)]
    return out


def reference_musc(maps, masks, connectivity=8, steps=200, max_fpr=0.3):
    """One full-image thresholding pass per threshold, one loop over components."""
    maps64 = maps.astype(np.float64)
    lo, hi = maps64.min(), maps64.max()
    comps = regions(masks, connectivity)
    normal = ~masks
    fprs, pros = [], []
    for k in range(steps):
        t = lo + k * ((hi - lo) / steps)
        binary = maps64 > t
        pros.append(np.mean([binary[i][reg].sum() / reg.sum() for i, reg in comps]))
        fprs.append(np.logical_and(binary, normal).sum() / normal.sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < max_fpr
    fprs, pros = fprs[keep], pros[keep]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    # threshold order (FPR non-increasing), as sklearn.metrics.auc integrates a decreasing x
    return -np.trapezoid(pros, fprs)


def reference_mvtec(maps, masks, connectivity=8, max_fpr=0.3):
    """Curve through every distinct threshold (score >= t), from (0, 0); area to max_fpr / max_fpr."""
    maps64 = maps.astype(np.float64)
    comps = regions(masks, connectivity)
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps64)[::-1]:
        binary = maps64 >= t
        ys.append(np.mean([binary[i][reg].sum() / reg.sum() for i, reg in comps]))
        xs.append(np.logical_and(binary, normal).sum() / normal.sum())
    area = 0.0
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:  # interpolate the segment that crosses the limit
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def make_data(seed, n=4, size=24, dtype=np.float32, quantise=None):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, 2, 2))
    masks = noise > np.quantile(noise, 0.9)
    masks[0] = False
    masks[1, 2, 2] = masks[1, 3, 3] = True  # diagonal neighbours: one region (8) or two (4)
    masks[1, 2, 3] = masks[1, 3, 2] = False
    maps = rng.standard_normal((n, size, size)) * 0.6 + 1.2 * masks
    if quantise:
        maps = np.round(maps * quantise) / quantise
    return maps.astype(dtype), masks


@pytest.mark.parametrize("seed,dtype,quantise", [(0, np.float32, None), (1, np.float16, None), (2, np.float32, 4)])
@pytest.mark.parametrize("connectivity", [8, 4])
def test_musc_matches_reference(seed, dtype, quantise, connectivity):
    maps, masks = make_data(seed, dtype=dtype, quantise=quantise)
    ours = pro(maps, masks, "musc", connectivity=connectivity)
    assert ours == pytest.approx(reference_musc(maps, masks, connectivity), abs=1e-4)


@pytest.mark.parametrize("seed,dtype,quantise", [(3, np.float32, None), (4, np.float16, None), (5, np.float32, 4)])
@pytest.mark.parametrize("connectivity", [8, 4])
def test_mvtec_matches_reference(seed, dtype, quantise, connectivity):
    maps, masks = make_data(seed, n=3, size=16, dtype=dtype, quantise=quantise)
    ours = pro(maps, masks, "mvtec", connectivity=connectivity)
    assert ours == pytest.approx(reference_mvtec(maps, masks, connectivity), abs=1e-4)


def test_mvtec_other_fpr_limit_and_torch_input():
    maps, masks = make_data(6, n=3, size=16)
    ref = reference_mvtec(maps, masks, max_fpr=0.05)
    assert pro(maps, masks, "mvtec", max_fpr=0.05) == pytest.approx(ref, abs=1e-4)
    assert pro(torch.from_numpy(maps), torch.from_numpy(masks), "mvtec", max_fpr=0.05) == pytest.approx(ref, abs=1e-4)


def test_variants_differ_and_perfect_maps_score_one():
    maps, masks = make_data(7)
    assert pro(maps, masks, "musc") != pytest.approx(pro(maps, masks, "mvtec"), abs=1e-3)
    perfect = masks.astype(np.float32)
    assert pro(perfect, masks, "mvtec") == pytest.approx(1.0)


def test_constant_maps():
    _, masks = make_data(8)
    maps = np.zeros(masks.shape, np.float16)
    # MVTec: the curve is the diagonal from (0,0) to (1,1): area 0.3^2/2 over 0.3
    assert pro(maps, masks, "mvtec") == pytest.approx(0.15)
    assert np.isnan(pro(maps, masks, "musc"))  # no threshold grid to rescale


def test_connectivity_changes_components():
    masks = np.zeros((1, 6, 6), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True
    w8, n8 = component_weights(masks, 8)
    w4, n4 = component_weights(masks, 4)
    assert (n8, n4) == (1, 2)
    assert np.allclose(w8, 0.5) and np.allclose(w4, 0.5)  # 1/(2*1) and 1/(1*2)
    with pytest.raises(ValueError, match="connectivity"):
        component_weights(masks, 6)


def test_no_anomaly_gives_nan_and_warning(caplog):
    maps, masks = make_data(9)
    with caplog.at_level(logging.WARNING, logger="anorefiner"):
        assert np.isnan(pro(maps, np.zeros_like(masks), "mvtec"))
        assert np.isnan(pro(maps, np.ones_like(masks), "musc"))
    assert caplog.text.count("undefined") >= 2


def test_bad_options_and_input():
    maps, masks = make_data(10)
    with pytest.raises(ValueError, match="variant"):
        pro(maps, masks, "anomalib")
    with pytest.raises(ValueError, match="max_fpr"):
        pro(maps, masks, "mvtec", max_fpr=0.0)
    maps[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="image index 2"):
        pro(maps, masks)


@pytest.mark.parametrize("seed,dtype,quantise", [(11, np.float16, None), (12, np.float32, 4)])
def test_musc_from_shared_ranking_matches_reference(seed, dtype, quantise):
    """evaluate_category's path: PRO read off the sort shared with the pixel metrics."""
    from anorefiner.metrics import prepare_pixels, pro_from_pixels

    maps, masks = make_data(seed, dtype=dtype, quantise=quantise)
    px = prepare_pixels(maps, masks, connectivity=8, keep_sorted=True)
    assert pro_from_pixels(px, "musc") == pytest.approx(reference_musc(maps, masks), abs=1e-4)
    assert pro_from_pixels(px, "mvtec") == pytest.approx(reference_mvtec(maps, masks), abs=1e-4)
