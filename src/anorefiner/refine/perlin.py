"""Perlin-noise anomaly masks (DRAEM-style, as used by the AnoRefiner paper Sec. 3.2 via [32]).

Mask recipe (specs/methods.md, "Pseudo-anomaly synthesis"): Perlin noise with a lattice scale of
2^U{0..5} cells per axis (drawn independently per axis), rotated by U(−90°, 90°), thresholded at 0.5.
An empty mask is re-drawn.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise of ``shape`` with ``res`` lattice cells per axis, values ≈ [−0.7, 0.7].

    Any shape is accepted: the noise is drawn on the next multiple of ``res`` and cropped.
    """
    h, w = int(shape[0]), int(shape[1])
    ry, rx = int(res[0]), int(res[1])
    if h < 1 or w < 1 or ry < 1 or rx < 1:
        raise ValueError(f"perlin_noise: shape={shape} and res={res} must be positive")
    hp, wp = -(-h // ry) * ry, -(-w // rx) * rx
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.arange(hp) * (ry / hp)
    x = np.arange(wp) * (rx / wp)
    iy, ix = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grads[iy[:, None] + dy, ix[None, :] + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    noise = np.sqrt(2.0) * (top * (1 - uy) + bottom * uy)
    return noise[:h, :w].astype(np.float32)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, *, min_exp: int = 0, max_exp: int = 5,
                threshold: float = 0.5, max_rotation: float = 90.0, max_redraws: int = 100) -> np.ndarray:
    """A non-empty boolean anomaly mask of ``shape`` (DRAEM recipe; see module doc)."""
    for _ in range(max_redraws):
        res = (2 ** int(rng.integers(min_exp, max_exp + 1)), 2 ** int(rng.integers(min_exp, max_exp + 1)))
        noise = perlin_noise(shape, res, rng)
        angle = float(rng.uniform(-max_rotation, max_rotation))
        noise = ndimage.rotate(noise, angle, reshape=False, order=1, mode="constant", cval=0.0)
        mask = noise > threshold
        if mask.any():
            return mask
    raise RuntimeError(f"perlin_mask: {max_redraws} draws at shape {shape} gave only empty masks "
                       f"(threshold {threshold} too high?)")
