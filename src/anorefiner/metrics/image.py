"""Image-level metrics: AUROC, AP and F1-max over image scores (paper Sec. 4, "Evaluation Metrics").

F1-max is the maximum over thresholds of ``2PR / (P + R)`` on the precision-recall curve, undefined
points (P + R = 0) ignored (methods.md, "Metric conventions").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from anorefiner.metrics.curves import binary_metrics, check_finite, rank, score_dtype, to_numpy


def validate_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as bool; values must be 0/1 (or bool)."""
    if labels.dtype == bool:
        return labels
    if labels.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected 0/1 values, got dtype {labels.dtype}")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        i = int(np.flatnonzero(bad.reshape(-1))[0])
        raise ValueError(f"{name}: expected 0/1 values, got {labels.reshape(-1)[i]!r} at index {i}")
    return labels.astype(bool)


def image_metrics(scores: Any, labels: Any) -> dict[str, float]:
    """AUROC, AP and F1-max of image scores ``[N]`` against labels ``[N]`` (1 = anomalous).

    Equal to scikit-learn's ``roc_auc_score``, ``average_precision_score`` and the maximum F1 of
    ``precision_recall_curve`` (ties included). When all images share one label the three values
    are NaN and a warning is logged (AUROC/AP are undefined, never reported as 0).

    Raises ``ValueError`` for empty input, a shape mismatch (naming both shapes), labels other than
    0/1, or a NaN/infinite score (naming its index).
    """
    s = score_dtype(to_numpy(scores, "scores"))
    y = to_numpy(labels, "labels")
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(
            f"scores [N] and labels [N] differ in shape: scores {s.shape}, labels {y.shape}"
        )
    if s.size == 0:
        raise ValueError("image_metrics: empty input (no scores)")
    check_finite(s, "scores")
    y = validate_labels(y)
    return binary_metrics(rank(s, s[y]), what="image scores")
