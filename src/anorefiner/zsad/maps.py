"""Small helpers shared by the backends: their device, float tensors from cached arrays, and scipy's Gaussian
smoothing of full-resolution maps (VCP-CLIP ``test.py`` sigma 8, AnomalyCLIP and AdaCLIP sigma 4: each
official code runs ``scipy.ndimage.gaussian_filter`` on every map, defaults truncate 4 and mode reflect)."""

from __future__ import annotations

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """A backend's option ``device``: ``"auto"`` = CUDA when available, else CPU; any other torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def float_tensor(x) -> torch.Tensor:
    """A float32 tensor of a tensor or an array (e.g. an HDF5 dataset slice of the feature cache)."""
    return x.float() if torch.is_tensor(x) else torch.from_numpy(np.asarray(x, dtype=np.float32))


def minmax(x):
    """``(x - min) / (max - min)`` over the whole tensor or array (a category's maps, a running prior); a
    constant input gives zeros (the official divisions would give NaN)."""
    lo, hi = x.min(), x.max()
    if hi <= lo:
        return torch.zeros_like(x) if torch.is_tensor(x) else np.zeros_like(x)
    return (x - lo) / (hi - lo)


def gaussian_smooth(maps, sigma: float, truncate: float = 4.0):
    """``gaussian_filter(m, sigma, truncate=truncate, mode='reflect')`` of every map of ``[B, H, W]``, in
    float64; ``sigma <= 0`` returns the input. A tensor comes back as a tensor of its dtype, an array as a
    float64 array."""
    if sigma <= 0:
        return maps
    from scipy.ndimage import gaussian_filter

    arr = maps.detach().cpu().double().numpy() if torch.is_tensor(maps) else np.asarray(maps, np.float64)
    out = np.stack([gaussian_filter(m, sigma=float(sigma), truncate=truncate, mode="reflect") for m in arr])
    return torch.from_numpy(out).to(maps.dtype) if torch.is_tensor(maps) else out
