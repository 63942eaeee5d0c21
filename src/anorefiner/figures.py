"""Figures: the qualitative grid of the paper's Fig. 7 and per-category bar charts (PNG, Agg).

- :func:`qualitative_grid`: one line per (category, backend) with the test image of largest
  anomalous area: image, ground truth, coarse map, refined (``combined``) map, as in Fig. 7/8–10.
- :func:`pixel_ap_bars`: per-category pixel AP of the coarse map and the refined map (Table 14's
  message: the refinement raises pixel AP in most categories).
- :func:`group_diagnostics`: one line per PGT group: a real image of the group and one of the
  pseudo-anomalies the group's ARD trained on, each with its mask, coarse, ARD and combined maps
  (issue 26: where the ARD helps and where it fires on normal structure).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .io import atomic_path

STORE_PATTERN = re.compile(
    r"(?:^|/)(?P<dataset>[^/]+)/(?P<backend>[^/]+)/(?P<variant>[^/]+)/seed(?P<seed>\d+)/(?P<category>[^/]+)\.h5$"
)
CELL_INCHES = 1.8  # one panel; small enough that 27 categories fit on one page-width figure
DPI = 100
OVERLAY_ALPHA = 0.5  # heat map over the image, as in the paper's figures


@dataclass(frozen=True)
class QualitativeItem:
    """One refined store (one category of one backend/variant/seed) and its dataset root."""

    store: Path
    data_root: Path
    dataset: str
    category: str
    label: str


def parse_store_path(path: str | Path) -> dict:
    """``results/refined/<dataset>/<backend>/<variant>/seed<k>/<category>.h5`` -> its parts."""
    m = STORE_PATTERN.search(Path(path).as_posix())
    if not m:
        raise ValueError(
            f"refined store path {path} does not end in <dataset>/<backend>/<variant>/seed<k>/<category>.h5"
        )
    parts = m.groupdict()
    parts["seed"] = int(parts["seed"])
    return parts


def _resize(arr: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    from PIL import Image

    resample = Image.NEAREST if nearest else Image.BILINEAR
    if arr.dtype == bool:
        img = Image.fromarray(arr.astype(np.uint8) * 255)
        return np.asarray(img.resize((size, size), resample)) >= 128
    return np.asarray(Image.fromarray(arr).resize((size, size), resample))


def most_anomalous(index_df: pd.DataFrame, ids: list[str], n: int = 1) -> list[str]:
    """The ``n`` test image ids of ``ids`` whose ground truth covers the largest image fraction."""
    from .data.index import load_mask

    test = index_df[(index_df["split"] == "test") & index_df["image_id"].isin(ids)]
    areas = []
    for r in test.itertuples(index=False):
        if r.mask_path is None or (isinstance(r.mask_path, float) and np.isnan(r.mask_path)) or not r.label:
            continue
        areas.append((float(load_mask(r.mask_path).mean()), r.image_id))
    if not areas:  # a category without anomalous test images: show the highest-ranked ids instead
        return list(ids[:n])
    areas.sort(key=lambda t: (-t[0], t[1]))
    return [image_id for _, image_id in areas[:n]]


def qualitative_grid(items: list[QualitativeItem], out_path: str | Path, n_per_item: int = 1,
                     methods: tuple[str, ...] = ("coarse", "combined")) -> Path:
    """Write the Fig. 7-style grid; heat maps are min-max scaled per store and method (over all of
    the store's images, so the colours of coarse and refined maps are each comparable across images)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data.index import index_category, load_image, load_mask
    from .refine.store import read_refined

    if not items:
        raise ValueError("qualitative_grid: no refined stores given")
    panels = []  # (label, image, mask, {method: map})
    for item in items:
        refined = read_refined(item.store, methods=methods)
        index = index_category(item.data_root, item.category, item.dataset)
        by_id = index.set_index("image_id")
        unknown = [i for i in refined.ids if i not in by_id.index]
        if unknown:
            raise ValueError(f"{item.store}: image id {unknown[0]!r} is not in the index of "
                             f"{item.data_root}/{item.category}")
        scale = {m: (float(np.min(refined.maps[m])), float(np.max(refined.maps[m]))) for m in methods}
        for image_id in most_anomalous(index, refined.ids, n_per_item):
            k = refined.ids.index(image_id)
            res = refined.maps[methods[0]].shape[-1]
            row = by_id.loc[image_id]
            image = _resize(load_image(row["image_path"]), res, nearest=False)
            mask_path = row["mask_path"]
            has_mask = isinstance(mask_path, str) and mask_path
            mask = _resize(load_mask(mask_path), res, nearest=True) if has_mask else np.zeros((res, res), bool)
            maps = {}
            for m in methods:
                lo, hi = scale[m]
                maps[m] = np.clip((refined.maps[m][k] - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
            panels.append((f"{item.label}\n{image_id}", image, mask, maps))
    titles = ["image", "ground truth"] + [("refined" if m == "combined" else m) for m in methods]
    nrows, ncols = len(panels), len(titles)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * CELL_INCHES, nrows * CELL_INCHES), dpi=DPI,
                             squeeze=False)
    for r, (label, image, mask, maps) in enumerate(panels):
        axes[r, 0].imshow(image)
        axes[r, 1].imshow(mask, cmap="gray", vmin=0, vmax=1)
        for c, m in enumerate(methods, start=2):
            axes[r, c].imshow(image)
            axes[r, c].imshow(maps[m], cmap="jet", vmin=0.0, vmax=1.0, alpha=OVERLAY_ALPHA)
        axes[r, 0].set_ylabel(label, fontsize=6)
        for c in range(ncols):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize=8)
    fig.subplots_adjust(left=0.08, right=0.99, top=1 - 0.35 / (nrows * CELL_INCHES), bottom=0.01,
                        wspace=0.03, hspace=0.08)
    return _save(fig, out_path)


def group_diagnostics(refined, images: list[np.ndarray], masks: np.ndarray, out_path: str | Path,
                      title: str = "") -> Path:
    """Per group of ``refined`` (a :class:`~anorefiner.refine.store.Refined` with ``diagnostics``): the group's
    real image of largest anomalous area (``images``/``masks`` in store order, at any size) and the group's
    first pseudo-anomaly, each as image, mask, coarse, ARD, combined (maps on a fixed 0-1 colour scale, the
    scale PGT averages them on; coarse is min-max scaled over the category)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(set(int(g) for g in refined.groups))
    lo, hi = float(np.min(refined.maps["coarse"])), float(np.max(refined.maps["coarse"]))
    titles = ["real image", "ground truth", "coarse", "ARD", "combined",
              "pseudo-anomaly", "its mask", "coarse", "ARD", "combined"]
    fig, axes = plt.subplots(len(groups), len(titles), figsize=(len(titles) * CELL_INCHES,
                             len(groups) * CELL_INCHES), dpi=DPI, squeeze=False)
    for r, g in enumerate(groups):
        members = np.flatnonzero(np.asarray(refined.groups) == g)
        k = int(members[np.argmax([masks[i].mean() for i in members])])
        res = refined.maps["coarse"].shape[-1]
        image = _resize(np.asarray(images[k]), res, nearest=False)
        real = [image, _resize(np.asarray(masks[k], bool), res, nearest=True),
                (refined.maps["coarse"][k] - lo) / (hi - lo if hi > lo else 1.0),
                refined.maps["ard"][k], refined.maps["combined"][k]]
        d = refined.diagnostics.get(f"group{g + 1}")
        pseudo = [d["image"], d["mask"], d["coarse"], d["ard"], d["combined"]] if d is not None else [None] * 5
        for c, panel in enumerate(real + pseudo):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
            if panel is None:
                ax.axis("off")
                continue
            panel = np.asarray(panel)
            if panel.ndim == 3 or panel.dtype == bool:
                ax.imshow(panel, cmap=None if panel.ndim == 3 else "gray", vmin=0, vmax=1 if panel.ndim == 2 else None)
            else:
                ax.imshow(real[0] if c < 5 else pseudo[0])
                ax.imshow(panel.astype(np.float32), cmap="jet", vmin=0.0, vmax=1.0, alpha=OVERLAY_ALPHA)
        verdict = {v["group"]: v["refined"] for v in refined.attrs.get("safeguard", [])}.get(g + 1)
        note = "" if verdict is None else (" refined" if verdict else " kept coarse")
        axes[r, 0].set_ylabel(f"group {g + 1}{note}\n{refined.ids[k]}", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.04, right=0.99, top=1 - 0.45 / (len(groups) * CELL_INCHES), bottom=0.01,
                        wspace=0.03, hspace=0.1)
    return _save(fig, out_path)


def pixel_ap_bars(metrics: pd.DataFrame, out_path: str | Path, dataset: str, backend: str,
                  variant: str = "default", metric: str = "pixel_ap") -> Path:
    """Grouped bars per category: coarse vs refined (``combined``) ``metric`` in %, mean over seeds
    (error bar = std over seeds when there are several; none for a single seed). The coarse values come
    from the variant's own ``coarse`` rows, else from variant ``coarse``."""
    return _save(bars_figure(metrics, dataset, backend, variant, metric), out_path)


def bars_figure(metrics: pd.DataFrame, dataset: str, backend: str, variant: str = "default",
                metric: str = "pixel_ap"):
    """The matplotlib figure of :func:`pixel_ap_bars`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = metrics[(metrics["dataset"] == dataset) & (metrics["backend"] == backend)
                  & (metrics["metric"] == metric) & (metrics["category"] != "mean")]
    refined = sel[(sel["variant"] == variant) & (sel["method"] == "combined")]
    coarse = sel[(sel["variant"] == variant) & (sel["method"] == "coarse")]
    if coarse.empty:
        coarse = sel[(sel["variant"] == "coarse") & (sel["method"] == "coarse")]
    if refined.empty or coarse.empty:
        raise ValueError(
            f"pixel_ap_bars: no {metric} rows for dataset={dataset!r} backend={backend!r} "
            f"({'refined variant ' + repr(variant) if refined.empty else 'coarse'} missing)"
        )
    stats = {}
    for name, frame in (("coarse", coarse), ("refined", refined)):
        g = frame.groupby("category")["value"]
        stats[name] = pd.DataFrame({"mean": 100 * g.mean(), "std": 100 * g.std(ddof=1)})
    cats = sorted(set(stats["coarse"].index) & set(stats["refined"].index))
    if not cats:
        raise ValueError("pixel_ap_bars: coarse and refined rows share no category")
    n_seeds = int(refined.groupby("category")["seed"].nunique().max()) if "seed" in refined else 1
    x = np.arange(len(cats) + 1)
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(x) + 2), 3.6), dpi=DPI)
    for offset, name, color in ((-width / 2, "coarse", "#9e9e9e"), (width / 2, "refined", "#d62728")):
        s = stats[name].loc[cats]
        means = list(s["mean"]) + [float(s["mean"].mean())]
        # one seed: no std, so no error bars at all (zero-length bars would read as "no spread")
        errs = [0.0 if np.isnan(v) else v for v in list(s["std"]) + [np.nan]] if n_seeds > 1 else None
        label = "coarse" if name == "coarse" else f"refined ({variant}, combined)"
        ax.bar(x + offset, means, width, yerr=errs, label=label, color=color, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(cats + ["mean"], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 100)
    seeds = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "1 seed, no error bars"
    ax.set_title(f"{dataset} / {backend}: {metric}, coarse vs refined ({seeds})", fontsize=9)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.11, right=0.99, top=0.9, bottom=0.3)
    return fig


def _save(fig, out_path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(out_path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return Path(out_path)
