"""Independent float64 loop re-implementations shared by the backend tests."""

from __future__ import annotations

import math

import numpy as np


def bilinear_align_corners(grid: np.ndarray, size: int) -> np.ndarray:
    """Loop version of bilinear upsampling of ``[h, w]`` to ``[size, size]`` with align_corners=True, float64."""
    h, w = grid.shape
    out = np.zeros((size, size))
    for i in range(size):
        y = i * (h - 1) / (size - 1)
        y0 = min(int(math.floor(y)), h - 2)
        for j in range(size):
            x = j * (w - 1) / (size - 1)
            x0 = min(int(math.floor(x)), w - 2)
            dy, dx = y - y0, x - x0
            out[i, j] = (grid[y0, x0] * (1 - dy) * (1 - dx) + grid[y0, x0 + 1] * (1 - dy) * dx
                         + grid[y0 + 1, x0] * dy * (1 - dx) + grid[y0 + 1, x0 + 1] * dy * dx)
    return out
