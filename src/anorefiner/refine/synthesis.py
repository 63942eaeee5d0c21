"""Pseudo-anomaly synthesis for PGT (AnoRefiner Sec. 3.2, Table 5).

* ``perlin_dtd`` (default, Table 5 (a)): DRAEM recipe — a Perlin mask (:mod:`.perlin`), a random
  texture image resized to the target and altered by 3 random colour/geometry augmentations, then
  ``img·(1−m) + (1−β)·tex·m + β·img·m`` with ``β ~ U(beta_min, beta_max)`` (DRAEM: U(0, 0.8)).
* ``cutpaste`` (Table 5 (b)): a rectangle cut from *another* pseudo-normal image and pasted at a random
  place; the mask is the pasted rectangle.
* ``seas`` (Table 5 (c)) needs real anomalies and a diffusion model: not reproducible offline.

Textures are items of :func:`anorefiner.data.textures.texture_source` (DTD paths for real runs,
offline arrays for the demo and tests) or any list of ``uint8 [H,W,3]`` arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from ..seeding import rng as make_rng
from .perlin import perlin_mask

METHODS = ("perlin_dtd", "cutpaste")


@dataclass
class SynthesisConfig:
    """Options of pseudo-anomaly synthesis (section ``synthesis`` of ``--options``)."""

    method: str = "perlin_dtd"  # Table 5: "perlin_dtd" (paper default) or "cutpaste"
    perlin_min_exp: int = 0  # lattice scale 2^U{min..max} per axis (DRAEM)
    perlin_max_exp: int = 5
    perlin_threshold: float = 0.5  # DRAEM threshold on the noise
    beta_max: float = 0.8  # β ~ U(beta_min, beta_max): share of the original image kept under the mask (DRAEM)
    # DRAEM draws β from 0. A higher beta_min gives fainter pseudo-anomalies: in the coarse map they score far
    # above real defects (issue 26: median 0.76 vs 0.49 inside the mask on transistor). Measured:
    # docs/refiner_audit.md.
    beta_min: float = 0.0
    n_augment: int = 3  # augmentations applied to each texture, out of the 10 below (DRAEM)
    cutpaste_area: tuple[float, float] = (0.02, 0.15)  # patch area / image area (CutPaste paper)
    cutpaste_aspect: tuple[float, float] = (0.3, 3.3)  # patch aspect ratio, log-uniform (CutPaste paper)

    def validate(self) -> None:
        if self.method == "seas":
            raise NotImplementedError("synthesis.method='seas' (Table 5 (c)) needs real anomaly images and a "
                                      "diffusion model; it is not implemented")
        if self.method not in METHODS:
            raise ValueError(f"synthesis.method={self.method!r}: expected one of {METHODS}")
        if not 0.0 <= self.beta_min <= self.beta_max < 1.0:
            raise ValueError(f"synthesis.beta_min={self.beta_min!r}, beta_max={self.beta_max!r}: expected "
                             "0 <= beta_min <= beta_max < 1")
        if not 0 <= self.n_augment <= len(AUGMENTATIONS):
            raise ValueError(f"synthesis.n_augment={self.n_augment!r}: expected 0..{len(AUGMENTATIONS)}")


# --- DRAEM-style texture augmentations: each takes (uint8 RGB array, rng) and returns one -----------
def _gamma(a, g):
    return np.clip(255.0 * (a / 255.0) ** g.uniform(0.5, 2.0), 0, 255).astype(np.uint8)


def _brightness(a, g):
    return np.clip(a * g.uniform(0.8, 1.2) + g.uniform(-30, 30), 0, 255).astype(np.uint8)


def _sharpness(a, g):
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(a)).enhance(g.uniform(0.0, 3.0)))


def _hue_saturation(a, g):
    hsv = np.asarray(Image.fromarray(a).convert("HSV")).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(g.integers(-36, 37))) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + int(g.integers(-50, 51)), 0, 255)
    return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))


def _solarize(a, g):
    return np.asarray(ImageOps.solarize(Image.fromarray(a), int(g.integers(32, 129))))


def _posterize(a, g):
    return np.asarray(ImageOps.posterize(Image.fromarray(a), int(g.integers(2, 7))))


def _invert(a, g):
    return 255 - a


def _autocontrast(a, g):
    return np.asarray(ImageOps.autocontrast(Image.fromarray(a)))


def _equalize(a, g):
    return np.asarray(ImageOps.equalize(Image.fromarray(a)))


def _rotate(a, g):
    return np.asarray(Image.fromarray(a).rotate(g.uniform(-45, 45), resample=Image.BILINEAR))


AUGMENTATIONS = (_gamma, _brightness, _sharpness, _hue_saturation, _solarize, _posterize, _invert,
                 _autocontrast, _equalize, _rotate)


def augment_texture(tex: np.ndarray, gen: np.random.Generator, n: int = 3) -> np.ndarray:
    """Apply ``n`` distinct augmentations drawn from :data:`AUGMENTATIONS` in random order."""
    for i in gen.choice(len(AUGMENTATIONS), size=n, replace=False):
        tex = AUGMENTATIONS[int(i)](np.ascontiguousarray(tex), gen)
    return np.ascontiguousarray(tex, dtype=np.uint8)


def _load_texture(item, size: tuple[int, int]) -> np.ndarray:
    from ..data.textures import load_texture

    return load_texture(item, size)


def perlin_texture_anomaly(img: np.ndarray, textures: Sequence, gen: np.random.Generator,
                           config: SynthesisConfig) -> tuple[np.ndarray, np.ndarray]:
    """One Perlin/texture pseudo-anomaly of ``img`` (uint8 [H,W,3]) → (image uint8, mask bool [H,W])."""
    if len(textures) == 0:
        raise ValueError("perlin_dtd synthesis needs at least one texture")
    h, w = img.shape[:2]
    mask = perlin_mask((h, w), gen, min_exp=config.perlin_min_exp, max_exp=config.perlin_max_exp,
                       threshold=config.perlin_threshold)
    tex = _load_texture(textures[int(gen.integers(len(textures)))], (h, w))
    tex = augment_texture(tex, gen, config.n_augment).astype(np.float32)
    beta = float(gen.uniform(config.beta_min, config.beta_max))
    m = mask[..., None].astype(np.float32)
    x = img.astype(np.float32)
    out = x * (1 - m) + (1 - beta) * tex * m + beta * x * m
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), mask


def cutpaste_anomaly(img: np.ndarray, donor: np.ndarray, gen: np.random.Generator,
                     config: SynthesisConfig) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste: a rectangle of ``donor`` pasted at a random place of ``img``; mask = the rectangle."""
    h, w = img.shape[:2]
    if donor.shape[:2] != (h, w):
        donor = np.asarray(Image.fromarray(donor).resize((w, h), Image.BILINEAR))
    area = gen.uniform(*config.cutpaste_area) * h * w
    aspect = float(np.exp(gen.uniform(np.log(config.cutpaste_aspect[0]), np.log(config.cutpaste_aspect[1]))))
    ph = int(np.clip(round(np.sqrt(area * aspect)), 1, h))
    pw = int(np.clip(round(np.sqrt(area / aspect)), 1, w))
    sy, sx = int(gen.integers(0, h - ph + 1)), int(gen.integers(0, w - pw + 1))
    ty, tx = int(gen.integers(0, h - ph + 1)), int(gen.integers(0, w - pw + 1))
    out = img.copy()
    out[ty:ty + ph, tx:tx + pw] = donor[sy:sy + ph, sx:sx + pw]
    mask = np.zeros((h, w), bool)
    mask[ty:ty + ph, tx:tx + pw] = True
    return out, mask


def synthesize(images: Sequence[np.ndarray], n_per_image: int, config: SynthesisConfig, textures: Sequence,
               seed: int, stream: tuple = ()) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """``n_per_image`` pseudo-anomalies of each pseudo-normal image (all uint8 [R,R,3], same size).

    Returns ``(images, masks bool [M,R,R], sources int [M])`` with ``M = len(images)·n_per_image``;
    ``sources[m]`` is the position in ``images`` that anomaly m was made from. Seeded by
    ``rng(seed, "synthesis", *stream)``: same seed and stream → same output.
    """
    config.validate()
    if len(images) == 0 or n_per_image < 1:
        raise ValueError(f"synthesize: need images and n_per_image >= 1 (got {len(images)}, {n_per_image})")
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"synthesize: images must share one [H,W,3] shape, got {sorted(shapes)}")
    gen = make_rng(seed, "synthesis", *stream)
    out, masks, sources = [], [], []
    for i, img in enumerate(images):
        for _ in range(n_per_image):
            if config.method == "perlin_dtd":
                aug, mask = perlin_texture_anomaly(img, textures, gen, config)
            else:
                others = [j for j in range(len(images)) if j != i] or [i]  # one image: paste from itself
                donor = images[int(others[int(gen.integers(len(others)))])]
                aug, mask = cutpaste_anomaly(img, donor, gen, config)
            out.append(aug)
            masks.append(mask)
            sources.append(i)
    return out, np.stack(masks), np.asarray(sources, dtype=np.int64)
