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


def bilinear_half_pixel(grid: np.ndarray, size: int) -> np.ndarray:
    """Loop version of bilinear upsampling of ``[h, w]`` to ``[size, size]`` with align_corners=False, float64."""
    h, w = grid.shape

    def taps(i, n_in):
        src = max((i + 0.5) * n_in / size - 0.5, 0.0)
        lo = min(int(math.floor(src)), n_in - 1)
        return lo, min(lo + 1, n_in - 1), src - lo

    out = np.zeros((size, size))
    for i in range(size):
        y0, y1, dy = taps(i, h)
        for j in range(size):
            x0, x1, dx = taps(j, w)
            out[i, j] = ((1 - dy) * ((1 - dx) * grid[y0, x0] + dx * grid[y0, x1])
                         + dy * ((1 - dx) * grid[y1, x0] + dx * grid[y1, x1]))
    return out


def _reflect(x: float, n: int) -> float:
    """Reflection of a pixel coordinate about the image borders at -0.5 and n - 0.5, clipped to [0, n - 1]."""
    lo, span = -0.5, float(n)
    d = abs(x - lo)
    flips, extra = math.floor(d / span), math.fmod(d, span)
    x = extra + lo if flips % 2 == 0 else span - extra + lo
    return min(max(x, 0.0), n - 1.0)


def affine_warp_loop(img: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Loop version of ``grid_sample(img, affine_grid(theta))``, bilinear, reflection padding, align_corners=False:
    ``img [C, H, W]``, ``theta [2, 3]`` mapping output to input normalised coordinates."""
    c, h, w = img.shape
    out = np.zeros_like(img, dtype=np.float64)
    for i in range(h):
        for j in range(w):
            xn, yn = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1
            xs = theta[0, 0] * xn + theta[0, 1] * yn + theta[0, 2]
            ys = theta[1, 0] * xn + theta[1, 1] * yn + theta[1, 2]
            px, py = _reflect(((xs + 1) * w - 1) / 2, w), _reflect(((ys + 1) * h - 1) / 2, h)
            x0, y0 = int(math.floor(px)), int(math.floor(py))
            for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[:, i, j] += wy * wx * img[:, yy, xx]
    return out


def float64_backbone(name: str, resolution: int, seed: int):
    """A random open_clip backbone in float64 (model and interpolated position embedding), for loop comparisons."""
    from anorefiner.backbones import build_backbone

    bb = build_backbone(name, resolution, pretrained=None, seed=seed)
    bb.model.double()
    bb.pos_embed = bb.pos_embed.double()
    return bb
