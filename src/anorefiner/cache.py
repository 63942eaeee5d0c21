"""HDF5 feature cache (one file per dataset, category, backbone and resolution)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Features:
    """Cached backbone features of one category's test images, in index order."""

    ids: list[str]
    layers: dict[str, np.ndarray]  # layer name -> [N, h, w, C]
    cls: np.ndarray | None = None  # [N, D] class/global token, None for CNNs
    attrs: dict = field(default_factory=dict)
