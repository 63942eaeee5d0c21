"""Image/pixel metrics (AUROC, AP, F1-max), PRO and tidy metric tables.

Exact (ties included) and equal to scikit-learn's ``roc_auc_score``, ``average_precision_score`` and
the F1 maximum of ``precision_recall_curve``, from one sort of the scores (``curves.py``).
"""

from anorefiner.metrics.evaluate import (
    METRIC_NAMES,
    EvalConfig,
    evaluate_category,
    resize_maps,
    resize_masks,
)
from anorefiner.metrics.image import image_metrics
from anorefiner.metrics.pixel import component_weights, pixel_metrics, prepare_pixels
from anorefiner.metrics.pro import PRO_VARIANTS, pro, pro_from_pixels
from anorefiner.metrics.tidy import (
    TIDY_COLUMNS,
    add_category_mean,
    read_metrics_csv,
    tidy_frame,
    validate_tidy,
    write_metrics_csv,
)

__all__ = [
    "METRIC_NAMES",
    "PRO_VARIANTS",
    "TIDY_COLUMNS",
    "EvalConfig",
    "add_category_mean",
    "component_weights",
    "evaluate_category",
    "image_metrics",
    "pixel_metrics",
    "prepare_pixels",
    "pro",
    "pro_from_pixels",
    "read_metrics_csv",
    "resize_maps",
    "resize_masks",
    "tidy_frame",
    "validate_tidy",
    "write_metrics_csv",
]
