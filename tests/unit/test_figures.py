"""Figures on synthetic refined stores and metrics: written, non-empty PNGs of the expected size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from anorefiner.cli import main as cli_main
from anorefiner.data.index import index_category, load_mask
from anorefiner.figures import CELL_INCHES, DPI, QualitativeItem, most_anomalous, parse_store_path, pixel_ap_bars, qualitative_grid
from anorefiner.refine.store import Refined, write_refined

RES = 64


def make_store(root, data_root, category, backend="musc_star"):
    """Coarse map = blurred ground truth + noise; refined = sharper ground truth + less noise."""
    index = index_category(data_root, category, "demo", split="test")
    rng = np.random.default_rng(0)
    coarse, combined = [], []
    for r in index.itertuples(index=False):
        mask = np.zeros((RES, RES), bool) if r.mask_path is None else np.asarray(
            Image.fromarray(load_mask(r.mask_path).astype(np.uint8) * 255).resize((RES, RES), Image.NEAREST)) > 127
        m = mask.astype(np.float32)
        coarse.append(gaussian_filter(m, 6) * 3 + 0.4 * rng.random((RES, RES)))
        combined.append(gaussian_filter(m, 1.5) + 0.1 * rng.random((RES, RES)))
    n = len(index)
    maps = {"coarse": np.stack(coarse), "combined": np.stack(combined)}
    maps["ard"] = maps["combined"]
    refined = Refined(ids=list(index["image_id"]), maps=maps,
                      scores={k: v.reshape(n, -1).max(1) for k, v in maps.items()}, groups=np.zeros(n, int))
    path = root / "refined" / "demo" / backend / "default" / "seed0" / f"{category}.h5"
    write_refined(path, refined)
    return path


def png_size(path):
    assert path.stat().st_size > 1000
    with Image.open(path) as img:
        return img.size


def test_qualitative_grid(tmp_path, demo_dataset):
    items = []
    for cat in ("tiles", "widget"):
        store = make_store(tmp_path, demo_dataset, cat)
        parts = parse_store_path(store)
        assert parts == dict(dataset="demo", backend="musc_star", variant="default", seed=0, category=cat)
        items.append(QualitativeItem(store, demo_dataset, "demo", cat, f"{cat} / musc_star"))
    out = qualitative_grid(items, tmp_path / "figures" / "qualitative.png")
    assert png_size(out) == (round(4 * CELL_INCHES * DPI), round(2 * CELL_INCHES * DPI))
    # the chosen image is the one with the largest anomalous area
    index = index_category(demo_dataset, "tiles", "demo", split="test")
    chosen = most_anomalous(index, list(index["image_id"]))[0]
    areas = {r.image_id: load_mask(r.mask_path).mean() for r in index.itertuples() if r.mask_path}
    assert areas[chosen] == max(areas.values())
    with pytest.raises(ValueError, match="seed<k>"):
        parse_store_path(tmp_path / "x.h5")


def synthetic_metrics():
    rows = []
    for seed in (0, 1):
        for i, cat in enumerate(("bottle", "cable", "screw")):
            for variant, method, value in (("coarse", "coarse", 0.5 + 0.1 * i), ("default", "coarse", 0.5 + 0.1 * i),
                                           ("default", "combined", 0.55 + 0.1 * i + 0.01 * seed)):
                rows.append(dict(dataset="mvtec_ad", category=cat, backend="musc_star", method=method,
                                 variant=variant, seed=seed, metric="pixel_ap", value=value))
    return pd.DataFrame(rows)


def test_bars_have_error_bars_only_with_several_seeds():
    from anorefiner.figures import bars_figure

    from matplotlib.container import ErrorbarContainer

    def n_error_bars(fig):
        return sum(isinstance(c, ErrorbarContainer) for c in fig.axes[0].containers)

    frame = synthetic_metrics()
    assert n_error_bars(bars_figure(frame, "mvtec_ad", "musc_star")) == 2  # coarse and refined
    one = bars_figure(frame[frame["seed"] == frame["seed"].min()], "mvtec_ad", "musc_star")
    assert n_error_bars(one) == 0  # no zero-length bars for one seed
    assert "1 seed, no error bars" in one.axes[0].get_title()


def test_pixel_ap_bars(tmp_path):
    out = pixel_ap_bars(synthetic_metrics(), tmp_path / "bars.png", "mvtec_ad", "musc_star")
    assert png_size(out) == (600, 360)
    with pytest.raises(ValueError, match="refined variant 'u20'"):
        pixel_ap_bars(synthetic_metrics(), tmp_path / "x.png", "mvtec_ad", "musc_star", variant="u20")


def test_cli_figures(tmp_path, demo_dataset):
    store = make_store(tmp_path, demo_dataset, "tiles")
    out = tmp_path / "q.png"
    assert cli_main(["figures", "--kind", "qualitative", "--stores", str(store), "--data-root",
                     f"demo={demo_dataset}", "--n-per-category", "2", "--out", str(out)]) == 0
    assert png_size(out) == (round(4 * CELL_INCHES * DPI), round(2 * CELL_INCHES * DPI))
    metrics = tmp_path / "m.csv"
    synthetic_metrics().to_csv(metrics, index=False)
    assert cli_main(["figures", "--kind", "bars", "--metrics", str(metrics), "--out", str(tmp_path / "b.png")]) == 0
    assert png_size(tmp_path / "b.png") == (600, 360)
    # the workflow's form: positional inputs, --root, --dataset/--backend checked against the store path
    out2 = tmp_path / "q2.png"
    assert cli_main(["figures", "--kind", "qualitative", "--root", str(demo_dataset), "--dataset", "demo",
                     "--backend", "musc_star", "--out", str(out2), str(store)]) == 0
    assert png_size(out2) == (round(4 * CELL_INCHES * DPI), round(1 * CELL_INCHES * DPI))
    assert cli_main(["figures", "--kind", "qualitative", "--root", str(demo_dataset), "--backend", "musc",
                     "--out", str(out2), str(store)]) == 1
    assert cli_main(["figures", "--kind", "bars", "--out", str(tmp_path / "b2.png"), str(metrics)]) == 0
