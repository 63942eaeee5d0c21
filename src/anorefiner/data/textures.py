"""Texture sources for pseudo-anomaly synthesis (methods.md "Pseudo-anomaly synthesis").

The paper pastes DTD textures into Perlin-noise masks (DRAEM recipe). DTD needs a ~600 MB
download, so an offline stand-in is provided: the images scikit-image ships inside its wheel
(``skimage/data/*.png|jpg``; these load with no network, unlike ``eagle``, ``lily``, ``kidney``,
``skin`` and ``nickel_solidification`` which need pooch downloads).

``texture_source("dtd", dtd_root)`` lists DTD image paths; ``texture_source("offline")`` returns
arrays. ``load_texture(item, size)`` turns either into a ``uint8 [size, size, 3]`` array.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from ..seeding import rng as make_rng

# Shipped grey images with texture-like content (checked to load offline with scikit-image 0.26).
OFFLINE_GREY = ("brick", "grass", "gravel", "moon", "coins", "cell", "camera")
# Shipped colour images; natural photos work as DRAEM texture sources as well as DTD does.
OFFLINE_COLOUR = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


@functools.lru_cache(maxsize=None)
def skimage_image(name: str) -> np.ndarray:
    """One of scikit-image's shipped images as uint8 (grey [H,W] or RGB [H,W,3]); read-only."""
    from skimage import data as skdata

    loader = getattr(skdata, name, None)
    if loader is None:
        raise ValueError(f"scikit-image has no data image named {name!r}")
    arr = np.asarray(loader())
    if arr.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name}() is {arr.dtype}, expected uint8")
    if arr.ndim == 3:
        arr = arr[..., :3]
    arr = np.ascontiguousarray(arr)
    arr.setflags(write=False)
    return arr


def colourise(grey: np.ndarray, dark: tuple[float, float, float], light: tuple[float, float, float]) -> np.ndarray:
    """Map a grey image onto the line from colour ``dark`` (0) to colour ``light`` (255)."""
    g = grey.astype(np.float32)[..., None] / 255.0
    lo = np.asarray(dark, np.float32)
    hi = np.asarray(light, np.float32)
    return np.clip(np.rint(lo + (hi - lo) * g), 0, 255).astype(np.uint8)


def resize_rgb(arr: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a uint8 image to ``size`` (int = square, or (H, W)) with bicubic filtering."""
    h, w = (size, size) if isinstance(size, int) else size
    if arr.shape[:2] == (h, w):
        return arr
    return np.asarray(Image.fromarray(arr).resize((w, h), Image.BICUBIC))


def _random_square_crop(arr: np.ndarray, gen: np.random.Generator, min_frac: float = 0.6) -> np.ndarray:
    h, w = arr.shape[:2]
    side_max = min(h, w)
    side = int(gen.integers(int(side_max * min_frac), side_max + 1))
    y = int(gen.integers(0, h - side + 1))
    x = int(gen.integers(0, w - side + 1))
    return arr[y : y + side, x : x + side]


def offline_textures(size: int = 256, seed: int = 0, crops: int = 1, exclude=()) -> list[np.ndarray]:
    """Offline DTD stand-in: ``crops`` random square crops of each shipped scikit-image image, resized
    to ``size``; grey crops are colourised with two random colours. Same seed → same arrays (the first
    crop of each image does not depend on ``crops``). Images named in ``exclude`` are left out: the demo
    dataset builds its ``brick`` and ``grass`` categories from the same photos, and a pseudo-anomaly made
    of the category's own material teaches the ARD that its normal surface is anomalous."""
    if size < 8:
        raise ValueError(f"texture size must be >= 8, got {size}")
    if crops < 1:
        raise ValueError(f"offline texture crops per image must be >= 1, got {crops}")
    out = []
    names = [n for n in OFFLINE_GREY + OFFLINE_COLOUR if n not in set(exclude)]
    for name in names:
        gen = make_rng(seed, "offline_texture", name)
        for _ in range(crops):
            crop = _random_square_crop(skimage_image(name), gen)
            if crop.ndim == 2:
                dark = gen.uniform(0, 110, 3)
                light = gen.uniform(140, 255, 3)
                crop = colourise(crop, tuple(dark), tuple(light))
            out.append(resize_rgb(np.ascontiguousarray(crop), size))
    return out


def dtd_images(dtd_root: str | Path) -> list[Path]:
    """Sorted DTD image paths (``<root>/images/<class>/*.jpg`` or ``<root>/dtd/images/...``)."""
    from .sources import dtd_texture_paths

    return dtd_texture_paths(dtd_root)


def texture_source(kind: str, dtd_root: str | Path | None = None, size: int = 256, seed: int = 0, exclude=()):
    """Texture images for synthesis: ``"dtd"`` → list of paths (needs ``dtd_root``);
    ``"offline"`` → list of ``uint8 [size,size,3]`` arrays from :func:`offline_textures` (``exclude``: names
    of shipped images to leave out, e.g. the category being refined)."""
    if kind == "dtd":
        if dtd_root is None:
            raise ValueError("texture source 'dtd' needs dtd_root (the extracted DTD folder)")
        return dtd_images(dtd_root)
    if kind == "offline":
        return offline_textures(size=size, seed=seed, exclude=exclude)
    raise ValueError(f"unknown texture source {kind!r}; expected 'dtd' or 'offline'")


def load_texture(item: str | Path | np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """A texture (path or array from :func:`texture_source`) as ``uint8 [H,W,3]`` at ``size``."""
    if isinstance(item, np.ndarray):
        arr = item
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"texture array must be uint8 [H,W,3], got {arr.dtype} {arr.shape}")
    else:
        from .index import load_image

        arr = load_image(item)
    return resize_rgb(arr, size)
