"""Coarse-map store: one HDF5 per (dataset, category, backend, seed)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Coarse:
    """Patch-level coarse anomaly maps of one category, in index order."""

    ids: list[str]
    maps: np.ndarray  # [N, h, w] float32
    scores: np.ndarray  # [N] float32 image-level scores
    attrs: dict = field(default_factory=dict)
