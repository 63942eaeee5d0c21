"""Tidy metric tables: one row per (dataset, category, backend, method, variant, seed, metric).

Files ``results/metrics/<dataset>/<backend>/<variant>/seed<k>/<category>.csv``
(docs/architecture.md) are written atomically and read back with their columns checked.
Per-category values come first; :func:`add_category_mean` appends the mean over categories
(methods.md, "Metric conventions").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from anorefiner.io import write_csv_atomic

TIDY_COLUMNS = ("dataset", "category", "backend", "method", "variant", "seed", "metric", "value")
MEAN_CATEGORY = "mean"


def tidy_frame(
    rows: Iterable[dict[str, Any]], dataset: str, category: str, backend: str, variant: str, seed: int
) -> pd.DataFrame:
    """Rows ``{method, metric, value}`` (from ``evaluate_category``) with their identifying columns."""
    frame = pd.DataFrame(list(rows), columns=["method", "metric", "value"])
    frame = frame.assign(dataset=dataset, category=category, backend=backend, variant=variant, seed=int(seed))
    return frame[list(TIDY_COLUMNS)]


def validate_tidy(frame: pd.DataFrame, where: str = "metrics table") -> pd.DataFrame:
    """Check the tidy columns (missing or extra ones are named) and numeric values; return ordered."""
    missing = [c for c in TIDY_COLUMNS if c not in frame.columns]
    extra = [c for c in frame.columns if c not in TIDY_COLUMNS]
    if missing or extra:
        raise ValueError(
            f"{where}: columns must be {', '.join(TIDY_COLUMNS)}; missing {missing or 'none'}, "
            f"unexpected {extra or 'none'}"
        )
    values = pd.to_numeric(frame["value"], errors="coerce")
    bad = values.isna() & frame["value"].notna()
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        raise ValueError(f"{where}: non-numeric value {frame['value'].iloc[i]!r} in row {i}")
    frame = frame.assign(value=values.astype(float))
    return frame[list(TIDY_COLUMNS)]


def write_metrics_csv(path: str | os.PathLike, frame: pd.DataFrame) -> Path:
    """Write a tidy metrics table atomically (temp file + rename); NaN is written as empty."""
    return write_csv_atomic(path, validate_tidy(frame, str(path)))


def read_metrics_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a tidy metrics CSV; raises ``FileNotFoundError``/``ValueError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    frame = pd.read_csv(path, dtype={"dataset": str, "category": str, "backend": str, "method": str,
                                     "variant": str, "metric": str})
    return validate_tidy(frame, str(path))


def add_category_mean(frame: pd.DataFrame, label: str = MEAN_CATEGORY) -> pd.DataFrame:
    """Append, per (dataset, backend, method, variant, seed, metric), the mean over categories.

    The mean rows get ``category == label``. A NaN category value (undefined metric) makes the
    mean NaN: it is not silently skipped. Existing ``label`` rows are replaced.
    """
    frame = validate_tidy(frame)
    per_category = frame[frame["category"] != label]
    keys = [c for c in TIDY_COLUMNS if c not in ("category", "value")]
    mean = (
        per_category.groupby(keys, sort=False, dropna=False)["value"]
        .apply(lambda v: v.mean(skipna=False))
        .reset_index()
        .assign(category=label)
    )
    return pd.concat([per_category, mean[list(TIDY_COLUMNS)]], ignore_index=True)
