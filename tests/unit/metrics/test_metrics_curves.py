"""Image and pixel AUROC / AP / F1-max against scikit-learn, ties included."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from anorefiner.metrics import image_metrics, pixel_metrics
from anorefiner.metrics.curves import binary_metrics, rank


def sklearn_metrics(y, s):
    y = np.asarray(y).reshape(-1).astype(int)
    s = np.asarray(s).reshape(-1).astype(np.float64)
    p, r, _ = precision_recall_curve(y, s)
    ok = (p + r) > 0
    f1 = 2 * p[ok] * r[ok] / (p[ok] + r[ok])
    return {"auroc": roc_auc_score(y, s), "ap": average_precision_score(y, s), "f1_max": f1.max()}


def assert_close(ours, ref, tol=1e-6):
    for k in ("auroc", "ap", "f1_max"):
        assert ours[k] == pytest.approx(ref[k], abs=tol), k


def blob_data(seed, n=5, size=40, dtype=np.float32):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, 3, 3))
    masks = noise > np.quantile(noise, 0.93)
    masks[0] = False  # one normal image
    maps = (rng.standard_normal((n, size, size)) * 0.5 + 1.5 * masks).astype(dtype)
    return maps, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.4
    scores = rng.integers(0, 6, 60) + labels * rng.integers(0, 3, 60)  # integer scores: many ties
    assert_close(image_metrics(scores, labels), sklearn_metrics(labels, scores))
    assert_close(image_metrics(scores.astype(np.float32), labels.astype(int)), sklearn_metrics(labels, scores))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_pixel_metrics_match_sklearn(dtype):
    maps, masks = blob_data(3, dtype=dtype)
    assert_close(pixel_metrics(maps, masks), sklearn_metrics(masks, maps))


def test_pixel_metrics_coarse_quantised_ties():
    maps, masks = blob_data(4)
    maps = np.round(maps * 4).astype(np.float16) / np.float16(4)  # few distinct values
    assert np.unique(maps.astype(np.float32)).size < 40
    assert_close(pixel_metrics(maps, masks), sklearn_metrics(masks, maps))


def test_constant_maps():
    _, masks = blob_data(5)
    maps = np.full(masks.shape, 0.25, dtype=np.float16)
    ours = pixel_metrics(maps, masks)
    assert_close(ours, sklearn_metrics(masks, maps))
    prevalence = masks.mean()
    assert ours["auroc"] == pytest.approx(0.5)
    assert ours["ap"] == pytest.approx(prevalence)
    assert ours["f1_max"] == pytest.approx(2 * prevalence / (1 + prevalence))


def test_perfect_and_inverted_scores():
    maps, masks = blob_data(6)
    perfect = masks.astype(np.float32)
    assert pixel_metrics(perfect, masks) == {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0}
    inverted = pixel_metrics(1.0 - perfect, masks)
    assert inverted["auroc"] == 0.0
    assert_close(inverted, sklearn_metrics(masks, 1.0 - perfect))


def test_torch_inputs_and_torch_ranking_agree_with_numpy():
    maps, masks = blob_data(7, dtype=np.float16)
    ref = pixel_metrics(maps, masks)
    assert pixel_metrics(torch.from_numpy(maps), torch.from_numpy(masks)) == ref
    # the device path (torch.sort/searchsorted), run here on CPU tensors
    every, pos = torch.from_numpy(maps), torch.from_numpy(maps[masks])
    assert_close(binary_metrics(rank(every, pos)), ref, tol=1e-12)
    bf16 = torch.from_numpy(maps.astype(np.float32)).bfloat16()
    assert_close(pixel_metrics(bf16, masks), sklearn_metrics(masks, bf16.float().numpy()))


@pytest.mark.gpu
def test_cuda_path_matches_cpu():
    maps, masks = blob_data(8, n=8, size=64)
    ref = pixel_metrics(maps, masks)
    ours = pixel_metrics(torch.from_numpy(maps).cuda(), torch.from_numpy(masks).cuda())
    assert_close(ours, ref, tol=1e-12)


def test_no_anomalous_or_no_normal_pixels_gives_nan_and_warning(caplog):
    maps, _ = blob_data(9)
    with caplog.at_level(logging.WARNING, logger="anorefiner"):
        out = pixel_metrics(maps, np.zeros(maps.shape, bool))
    assert all(np.isnan(v) for v in out.values())
    assert "undefined" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anorefiner"):
        out = pixel_metrics(maps, np.ones(maps.shape, bool))
    assert all(np.isnan(v) for v in out.values())
    assert "undefined" in caplog.text
    with caplog.at_level(logging.WARNING, logger="anorefiner"):
        out = image_metrics([0.1, 0.2, 0.3], [1, 1, 1])
    assert all(np.isnan(v) for v in out.values())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_name_the_image(bad):
    maps, masks = blob_data(10)
    maps[3, 5, 7] = bad
    with pytest.raises(ValueError, match="image index 3"):
        pixel_metrics(maps, masks)
    with pytest.raises(ValueError, match="index 2"):
        image_metrics([0.1, 0.5, bad, 0.2], [0, 1, 1, 0])


def test_shape_mismatch_names_both_shapes():
    maps, masks = blob_data(11)
    with pytest.raises(ValueError, match=r"\(5, 40, 40\).*\(5, 40, 39\)"):
        pixel_metrics(maps, masks[:, :, :39])
    with pytest.raises(ValueError, match=r"\(4,\).*\(3,\)"):
        image_metrics([0.1, 0.2, 0.3, 0.4], [0, 1, 0])
    with pytest.raises(ValueError, match=r"\[N,H,W\]"):
        pixel_metrics(maps[0], masks[0])


def test_empty_input_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        pixel_metrics(np.zeros((0, 8, 8), np.float32), np.zeros((0, 8, 8), bool))
    with pytest.raises(ValueError, match="empty"):
        image_metrics([], [])


def test_bad_labels_and_masks_are_named():
    with pytest.raises(ValueError, match="index 1"):
        image_metrics([0.1, 0.2], [0, 2])
    maps, masks = blob_data(12)
    bad = masks.astype(np.uint8)
    bad[2, 0, 0] = 3
    with pytest.raises(ValueError, match="image index 2"):
        pixel_metrics(maps, bad)
