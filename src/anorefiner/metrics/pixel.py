"""Pixel-level AUROC, AP and F1-max over all pixels of all test images of a category.

Paper Sec. 4 ("Evaluation Metrics"): pixel-wise AUROC, AP and F1-max; methods.md ("Metric
conventions"): one pooled set of pixels per category. All pixels are sorted once and the
anomalous ones ranked among the normal ones (``curves.rank``); PRO (``pro.py``) reuses the same
ranking through :func:`prepare_pixels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from anorefiner.metrics.curves import (
    Ranked,
    binary_metrics,
    check_finite,
    check_finite_torch,
    is_torch,
    rank,
    score_dtype,
    to_numpy,
)


@dataclass
class PixelScores:
    """Ranked pixel scores of one category (see ``curves.Ranked``).

    ``weights``: per anomalous pixel, in ``ranked.pos`` order, ``1 / (area of its ground-truth
    component * number of components)`` (PRO), or None when not requested.
    ``lo``/``hi``: minimum and maximum score over all pixels.
    """

    ranked: Ranked
    lo: float
    hi: float
    weights: np.ndarray | None = None
    n_components: int = 0
    shape: tuple[int, ...] = ()


def validate_pixels(maps: Any, masks: Any) -> tuple[Any, Any]:
    """Check shapes ``[N,H,W]``/``[N,H,W]``, non-empty, finite; return (maps, bool masks).

    CUDA tensors stay on their device; everything else becomes NumPy (CPU tensors without a copy).
    """
    on_device = is_torch(maps) and maps.device.type != "cpu"
    if on_device:
        masks = torch.as_tensor(masks, device=maps.device)
    else:
        maps = score_dtype(to_numpy(maps, "maps"))
        masks = to_numpy(masks, "masks")
    if tuple(maps.shape) != tuple(masks.shape) or len(maps.shape) != 3:
        raise ValueError(
            f"maps and masks must both be [N,H,W] with equal shapes: maps {tuple(maps.shape)}, "
            f"masks {tuple(masks.shape)}"
        )
    if 0 in tuple(maps.shape):
        raise ValueError(f"empty input: maps have shape {tuple(maps.shape)}")
    if on_device:
        if not maps.dtype.is_floating_point:
            maps = maps.double()
        check_finite_torch(maps, "maps")
        if masks.dtype != torch.bool:
            bad = (masks != 0) & (masks != 1)
            if bool(bad.any()):
                i = int(torch.nonzero(bad.reshape(bad.shape[0], -1).any(dim=1))[0, 0])
                raise ValueError(f"masks: image index {i} has values other than 0/1 (or bool)")
            masks = masks != 0
        return maps, masks
    check_finite(maps, "maps")
    if masks.dtype != bool:
        bad = ~np.isin(masks, (0, 1))
        if bad.any():
            i = int(np.flatnonzero(bad.reshape(masks.shape[0], -1).any(axis=1))[0])
            raise ValueError(f"masks: image index {i} has values other than 0/1 (or bool)")
        masks = masks.astype(bool)
    return maps, masks


def prepare_pixels(
    maps: Any,
    masks: Any,
    connectivity: int | None = None,
    keep_sorted: bool = False,
    components: tuple[np.ndarray, int] | None = None,
) -> PixelScores:
    """Validate and rank the anomalous pixels among the normal ones with one sort.

    ``connectivity`` (4 or 8; None = skip) labels the ground-truth components for PRO and attaches
    per-anomalous-pixel weights. ``keep_sorted`` keeps all scores sorted for threshold
    counts (MuSc PRO) and the score range. ``components`` reuses the result of
    :func:`component_weights` for these masks (several methods, one ground truth).
    """
    maps, masks = validate_pixels(maps, masks)
    weights, n_components = None, 0
    if components is not None:
        weights, n_components = components
        if weights.shape[0] != int(masks.sum()):
            raise ValueError(f"components hold {weights.shape[0]} weights for {int(masks.sum())} anomalous pixels")
    elif connectivity is not None:
        cpu_masks = masks.cpu().numpy() if is_torch(masks) else masks
        weights, n_components = component_weights(cpu_masks, connectivity)
    r = rank(maps, maps[masks], keep_sorted=keep_sorted)
    lo, hi = _extremes(r) if keep_sorted else (float("nan"), float("nan"))
    if weights is not None:
        weights = weights[r.order]
    return PixelScores(r, lo, hi, weights, n_components, tuple(maps.shape))


def component_weights(masks: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Ground-truth connected components (``scipy.ndimage.label``, per image) as pixel weights.

    Returns, for every anomalous pixel in C order of ``masks`` (the order of ``maps[masks]``),
    ``1 / (area of its component * total number of components)``, and the number of components.
    PRO at a threshold is then the sum of the weights of the anomalous pixels above it.
    ``connectivity`` 8 (diagonal neighbours join) matches the MVTec evaluation code and
    ``skimage.measure.label`` as used by MuSc; 4 is offered for comparison.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    parts, total = [], 0
    for i in range(masks.shape[0]):
        if not masks[i].any():
            continue
        labels, n = ndimage.label(masks[i], structure=structure)
        areas = np.bincount(labels.reshape(-1)).astype(np.float64)
        parts.append(1.0 / areas[labels[masks[i]]])
        total += n
    if total == 0:
        return np.zeros(0, dtype=np.float64), 0
    return np.concatenate(parts) / total, total


def _extremes(r: Ranked) -> tuple[float, float]:
    """Minimum and maximum over all pixels, read off the two sorted arrays."""
    lows, highs = [], []
    if r.n_pos:
        lows.append(float(r.pos[0]))
        highs.append(float(r.pos[-1]))
    if r.sorted_all is not None and r.sorted_all.shape[0]:
        lows.append(float(r.sorted_all[0]))
        highs.append(float(r.sorted_all[-1]))
    if not lows:
        return float("nan"), float("nan")
    return min(lows), max(highs)


def pixel_metrics(maps: Any, masks: Any) -> dict[str, float]:
    """Pixel AUROC, AP and F1-max pooled over all pixels of ``maps [N,H,W]`` vs ``masks [N,H,W]``.

    Exact (ties included) and equal to scikit-learn's ``roc_auc_score``,
    ``average_precision_score`` and the F1 maximum of ``precision_recall_curve`` on the flattened
    arrays. Accepts NumPy arrays or torch tensors (CUDA tensors are ranked on their device).

    When the masks hold no anomalous pixel, or no normal pixel, the three values are NaN and a
    warning is logged (the metrics are undefined there; never a crash or a silent 0).

    Raises ``ValueError`` for empty input, shapes that differ (naming both), mask values other than
    0/1, or NaN/infinite scores (naming the image index).
    """
    px = prepare_pixels(maps, masks)
    return binary_metrics(px.ranked, what="pixels")
