"""evaluate_category, resizing rules, and the tidy CSV helpers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from anorefiner.config import ConfigError, from_dict
from anorefiner.metrics import (
    METRIC_NAMES,
    TIDY_COLUMNS,
    EvalConfig,
    add_category_mean,
    evaluate_category,
    image_metrics,
    pixel_metrics,
    pro,
    read_metrics_csv,
    resize_masks,
    tidy_frame,
    write_metrics_csv,
)


def category(seed=0, n=6, size=32):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, 3, 3))
    masks = noise > np.quantile(noise, 0.92)
    masks[:2] = False
    labels = masks.any(axis=(1, 2)).astype(int)
    maps = (rng.standard_normal((n, size, size)) * 0.5 + masks).astype(np.float32)
    return maps, masks, labels, rng.standard_normal(n) + labels


def test_rows_equal_direct_metrics_at_kept_resolution():
    maps, masks, labels, scores = category()
    opts = EvalConfig(resolution=None, pro_variant="mvtec")
    rows = evaluate_category({"coarse": (maps, scores), "ard": (maps ** 3, scores * 2)}, masks, labels, opts)
    assert [r["metric"] for r in rows[:7]] == list(METRIC_NAMES)
    got = {(r["method"], r["metric"]): r["value"] for r in rows}
    px, im = pixel_metrics(maps, masks), image_metrics(scores, labels)
    for k in ("auroc", "ap", "f1_max"):
        assert got[("coarse", f"pixel_{k}")] == pytest.approx(px[k], abs=1e-12)
        assert got[("coarse", f"image_{k}")] == pytest.approx(im[k], abs=1e-12)
    assert got[("coarse", "pixel_pro")] == pytest.approx(pro(maps, masks, "mvtec"), abs=1e-12)
    assert got[("ard", "pixel_pro")] == pytest.approx(pro(maps ** 3, masks, "mvtec"), abs=1e-12)


def test_patch_maps_are_upsampled_and_pro_can_be_skipped():
    maps, masks, labels, scores = category(1)
    patch = maps.reshape(6, 8, 4, 8, 4).mean(axis=(2, 4))  # 8x8 "patch" maps
    rows = evaluate_category({"coarse": (patch, scores)}, masks, labels,
                             EvalConfig(resolution=16, compute_pro=False))
    assert {r["metric"] for r in rows} == set(METRIC_NAMES) - {"pixel_pro"}
    assert all(np.isfinite(r["value"]) for r in rows)


def test_mask_resize_rules():
    masks = np.zeros((1, 16, 16), bool)
    masks[0, 4:12, 4:12] = True
    near = resize_masks(masks, (32, 32), "nearest")
    assert near.sum() == 4 * masks.sum()  # exact 2x upsampling keeps the square
    cast = resize_masks(masks, (12, 12), "bilinear_cast")
    assert cast.sum() < resize_masks(masks, (12, 12), "nearest").sum()  # borders shrink
    assert cast[0, 6, 6]  # the interior survives
    with pytest.raises(ValueError, match="mask_resize"):
        resize_masks(masks, (8, 8), "bicubic")


def test_mask_rule_changes_pixel_metrics():
    maps, masks, labels, scores = category(2)
    out = {}
    for rule in ("nearest", "bilinear_cast"):
        rows = evaluate_category({"m": (maps, scores)}, masks, labels, EvalConfig(resolution=20, mask_resize=rule))
        out[rule] = {r["metric"]: r["value"] for r in rows}
    assert out["nearest"]["pixel_ap"] != out["bilinear_cast"]["pixel_ap"]
    assert out["nearest"]["image_ap"] == out["bilinear_cast"]["image_ap"]


def test_config_validation():
    assert from_dict(EvalConfig, {"resolution": 256, "pro_variant": "mvtec"}).resolution == 256
    with pytest.raises(ConfigError, match="evaluation.foo"):
        from_dict(EvalConfig, {"foo": 1}, "evaluation")
    for bad in ({"pro_variant": "x"}, {"mask_resize": "x"}, {"resolution": 0}, {"pro_connectivity": 6}):
        with pytest.raises(ValueError):
            EvalConfig(**bad)


def test_method_errors_are_named():
    maps, masks, labels, scores = category(3)
    maps[4, 1, 1] = np.inf
    with pytest.raises(ValueError, match="'ard'.*image index 4"):
        evaluate_category({"ard": (maps, scores)}, masks, labels, EvalConfig(resolution=None))
    with pytest.raises(ValueError, match="'ard': 5 maps"):
        evaluate_category({"ard": (maps[:5], scores)}, masks, labels, EvalConfig(resolution=None))
    with pytest.raises(ValueError, match="no methods"):
        evaluate_category({}, masks, labels)


def test_tidy_csv_round_trip_and_mean(tmp_path):
    frames = []
    for cat, base in (("bottle", 0.9), ("cable", 0.7)):
        rows = [{"method": "coarse", "metric": m, "value": base} for m in METRIC_NAMES]
        frames.append(tidy_frame(rows, "mvtec_ad", cat, "musc", "default", 0))
    frame = pd.concat(frames, ignore_index=True)
    frame.loc[frame.index[-1], "value"] = np.nan  # an undefined metric
    path = tmp_path / "m" / "x.csv"
    write_metrics_csv(path, frame)
    back = read_metrics_csv(path)
    assert tuple(back.columns) == TIDY_COLUMNS
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)
    assert not list(path.parent.glob(".*tmp"))
    means = add_category_mean(back).query("category == 'mean'").set_index("metric")["value"]
    assert means["image_auroc"] == pytest.approx(0.8)
    assert np.isnan(means["pixel_pro"])  # NaN propagates, never skipped


def test_reader_names_missing_columns_and_bad_values(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"dataset": ["d"], "value": [1.0]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"bad.csv.*missing.*category"):
        read_metrics_csv(bad)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_metrics_csv(tmp_path / "nope.csv")
    rows = tidy_frame([{"method": "a", "metric": "image_ap", "value": "high"}], "d", "c", "b", "v", 0)
    with pytest.raises(ValueError, match="non-numeric value 'high'"):
        write_metrics_csv(tmp_path / "x.csv", rows)
