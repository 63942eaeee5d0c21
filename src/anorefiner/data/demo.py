"""Offline demo dataset in MVTec layout: seeded normal images with real-looking defects and exact masks.

Normal images: texture categories cropped from scikit-image's shipped grey photos (``brick``,
``grass``, ``gravel``), a procedurally drawn ``tiles`` texture, and an object category ``widget``
(a machined washer with six printed dots and an orientation notch). Every image gets its own
crop / flip / pose / lighting / noise, so zero-shot methods never see identical normals.

Defects are deliberately unlike the Perlin-noise + texture pseudo-anomalies the refiner trains on
(methods.md "Pseudo-anomaly synthesis"): scratches (thin polylines), cracks (branching random
walks), holes (shaded dark ellipses), stains (smooth blobs with a colour shift) and, on the object,
missing pieces and displaced marks; sizes range from a pixel-wide line to ~15 % of the image.
A mask is exactly the set of pixels that differ from the clean image the defect was drawn on
(:func:`render_test_image` returns both).

The dataset is written to ``<root>.partial/`` and renamed to ``<root>`` together with a
``.complete`` marker (JSON of the parameters), so a killed run never looks finished.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from ..io import write_json_atomic
from ..log import LOG, progress
from ..seeding import rng as make_rng
from .textures import skimage_image

FORMAT_VERSION = 1  # bump whenever rendering changes, so existing demo folders are regenerated
MARKER = ".complete"
# Ownership tag: Snakemake deletes the output marker before a rerun; this file still says the
# folder is a generated demo that may be replaced.
OWNER_TAG = ".anorefiner-demo"
TEXTURE_DEFECTS = ("crack", "hole", "scratch", "stain")
OBJECT_DEFECTS = ("displaced", "missing", "scratch", "stain")
DEFAULT_CATEGORIES = ("brick", "grass", "tiles", "widget")
MIN_IMAGE_SIZE = 32  # below this a 1-px scratch covers most of a widget's ring


@dataclass(frozen=True)
class Normal:
    image: np.ndarray  # uint8 [H,W,3] clean image
    support: np.ndarray  # bool [H,W]: where surface defects may be drawn (the object; all for textures)
    redraw: Callable[..., np.ndarray] | None = None  # object only: redraw(missing=..., displaced=...)


@dataclass(frozen=True)
class Generator:
    name: str
    kind: str  # "texture" | "object"
    defects: tuple[str, ...]
    render: Callable[[np.random.Generator, int], Normal]


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _smooth_noise(gen: np.random.Generator, size: int, cells: int) -> np.ndarray:
    grid = gen.random((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


# ----------------------------------------------------------------------------- normal images
_PALETTES = {  # dark / light colour of each grey photo (textures look like material, not grey)
    "brick": ((62, 28, 22), (228, 138, 102)),
    "grass": ((16, 38, 10), (165, 208, 92)),
    "gravel": ((40, 38, 36), (214, 202, 186)),
}


def _photo_texture(name: str) -> Callable[[np.random.Generator, int], Normal]:
    def render(gen: np.random.Generator, size: int) -> Normal:
        src = skimage_image(name)
        side = int(gen.integers(230, 300))  # ~1 source pixel per output pixel at 256², varied scale
        y = int(gen.integers(0, src.shape[0] - side + 1))
        x = int(gen.integers(0, src.shape[1] - side + 1))
        crop = src[y : y + side, x : x + side]
        if gen.random() < 0.5:
            crop = crop[:, ::-1]
        if gen.random() < 0.5:
            crop = crop[::-1]
        grey = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BICUBIC), np.float32)
        grey = (grey * gen.uniform(0.93, 1.07) + gen.uniform(-8, 8))[..., None] / 255.0
        dark, light = (np.asarray(c, np.float32) for c in _PALETTES[name])
        rgb = dark + (light - dark) * grey + gen.normal(0, 2.0, (size, size, 3))
        return Normal(_u8(rgb), np.ones((size, size), bool))

    return render


def _tiles(gen: np.random.Generator, size: int) -> Normal:
    """Ceramic tiles: 4×4 grid, random phase and pitch, per-tile tint, bevelled edges, grout."""
    n = 4
    period = size / n * gen.uniform(0.96, 1.04)
    phase = gen.uniform(0, period, 2)
    yy, xx = _grid(size)
    u, v = (yy + phase[0]) / period, (xx + phase[1]) / period
    iu, iv = np.floor(u).astype(int), np.floor(v).astype(int)
    fu, fv = (u - iu) * period, (v - iv) * period
    edge = np.minimum(np.minimum(fu, period - fu), np.minimum(fv, period - fv))
    half_grout = max(0.6, period * 0.035)
    a = np.clip(edge - half_grout + 0.5, 0, 1)[..., None]
    # per-tile brightness plus a faint hue shift (glazed tiles from one batch)
    tint = gen.normal(0, 6, (n + 3, n + 3, 1)) + gen.normal(0, 2.5, (n + 3, n + 3, 3))
    bevel = 1 - 0.14 * np.exp(-np.maximum(edge - half_grout, 0) / max(1.0, period * 0.05))
    mottle = _smooth_noise(gen, size, 7) * 16 - 8
    tile = (np.array([198, 180, 150]) + tint[iu, iv]) * bevel[..., None] + mottle[..., None]
    grout = np.array([104, 99, 94]) + _smooth_noise(gen, size, 12)[..., None] * 10
    img = grout * (1 - a) + tile * a + gen.normal(0, 2.0, (size, size, 3))
    return Normal(_u8(img), np.ones((size, size), bool))


def _widget(gen: np.random.Generator, size: int) -> Normal:
    """A washer on a dark table: ring, notch at angle theta, six printed dots, directional light."""
    s = float(size)
    cy, cx = s / 2 + gen.uniform(-0.03, 0.03, 2) * s
    big_r, small_r = s * 0.36 * gen.uniform(0.98, 1.02), s * 0.14 * gen.uniform(0.98, 1.02)
    theta, light = gen.uniform(0, 2 * math.pi), 0.75 * math.pi + gen.uniform(-0.35, 0.35)
    gain = gen.uniform(0.94, 1.06)
    yy, xx = _grid(size)
    bg = np.array([50, 56, 66]) + (10 * yy / s + 6 * _smooth_noise(gen, size, 5))[..., None]
    brushed = gen.normal(0, 3.0, (size, size)).astype(np.float32)
    sensor = gen.normal(0, 1.5, (size, size, 3)).astype(np.float32)
    dy, dx = yy - cy, xx - cx
    rho, phi = np.hypot(dy, dx), np.arctan2(dy, dx)
    mid, dot_r = (big_r + small_r) / 2, s * 0.028

    def draw(missing: tuple[float, float] | None = None, displaced: tuple[int, float, float] | None = None):
        alpha = np.clip(0.5 - np.maximum(rho - big_r, small_r - rho), 0, 1)
        t = dx * math.cos(theta) + dy * math.sin(theta) - big_r
        q = -dx * math.sin(theta) + dy * math.cos(theta)
        alpha = alpha * (1 - np.clip(0.5 - np.maximum(np.abs(t) - 0.05 * s, np.abs(q) - 0.03 * s), 0, 1))
        if missing is not None:  # a bite of radius b taken out of the rim at angle phi_m
            phi_m, b = missing
            my, mx = cy + big_r * math.sin(phi_m), cx + big_r * math.cos(phi_m)
            alpha = alpha * (1 - np.clip(0.5 - (np.hypot(yy - my, xx - mx) - b), 0, 1))
        radial = np.clip((rho - small_r) / (big_r - small_r), 0, 1)
        metal = gain * (140 + 45 * np.cos(phi - light) * radial + 25 * np.exp(-((rho - big_r + 2) ** 2) / 8) + brushed)
        obj = metal[..., None] * np.array([1.0, 0.99, 0.95])
        dots = np.zeros_like(rho)
        for k in range(6):
            ang, rad = theta + math.pi / 6 + k * math.pi / 3, mid
            if displaced is not None and displaced[0] == k:
                ang, rad = ang + displaced[1], rad + displaced[2]
            d = np.hypot(yy - (cy + rad * math.sin(ang)), xx - (cx + rad * math.cos(ang)))
            dots = np.maximum(dots, np.clip(0.5 - (d - dot_r), 0, 1))
        obj = obj * (1 - dots[..., None]) + np.array([38, 38, 46]) * dots[..., None]
        a = alpha[..., None]
        return _u8(bg * (1 - a) + obj * a + sensor), alpha

    image, alpha = draw()
    return Normal(image, alpha > 0.5, lambda **kw: draw(**kw)[0])


GENERATORS: dict[str, Generator] = {
    "brick": Generator("brick", "texture", TEXTURE_DEFECTS, _photo_texture("brick")),
    "grass": Generator("grass", "texture", TEXTURE_DEFECTS, _photo_texture("grass")),
    "gravel": Generator("gravel", "texture", TEXTURE_DEFECTS, _photo_texture("gravel")),
    "tiles": Generator("tiles", "texture", TEXTURE_DEFECTS, _tiles),
    "widget": Generator("widget", "object", OBJECT_DEFECTS, _widget),
}


# ----------------------------------------------------------------------------- defects
def _pick_point(gen: np.random.Generator, support: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(support)
    i = int(gen.integers(0, len(ys)))
    return float(ys[i]), float(xs[i])


def _draw_lines(size: int, segments: list[tuple[tuple[float, float], tuple[float, float]]], width: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    pen = ImageDraw.Draw(canvas)
    for (y0, x0), (y1, x1) in segments:
        pen.line([(x0, y0), (x1, y1)], fill=255, width=width)
        if width > 2:  # round joints so bends do not leave notches
            r = width / 2
            pen.ellipse([x1 - r, y1 - r, x1 + r, y1 + r], fill=255)
    return np.asarray(canvas, np.float32) / 255.0


def _scratch(gen, clean, support):
    size = clean.shape[0]
    width = max(1, int(round(size * gen.uniform(0.003, 0.012))))
    n_seg = int(gen.integers(2, 5))
    step = size * gen.uniform(0.12, 0.5) / n_seg
    p, segs = _pick_point(gen, support), []
    # head roughly towards the centre so the scratch stays in the picture
    ang = math.atan2(size / 2 - p[0], size / 2 - p[1]) + gen.uniform(-1.2, 1.2)
    for _ in range(n_seg):
        ang += gen.normal(0, 0.25)
        q = (p[0] + step * math.sin(ang), p[1] + step * math.cos(ang))
        segs.append((p, q))
        p = q
    alpha = _draw_lines(size, segs, width) * gen.uniform(0.75, 1.0)
    c = clean.astype(np.float32)
    target = c + (255 - c) * 0.8 if gen.random() < 0.5 else c * 0.3
    return target, alpha


def _crack(gen, clean, support):
    size = clean.shape[0]
    step, segs = size * 0.025, []
    stack = [(_pick_point(gen, support), gen.uniform(0, 2 * math.pi), int(gen.integers(6, 20)))]
    while stack:
        p, ang, n = stack.pop()
        for i in range(n):
            ang += gen.normal(0, 0.35)
            q = (p[0] + step * math.sin(ang), p[1] + step * math.cos(ang))
            segs.append((p, q))
            if gen.random() < 0.15 and len(segs) < 60 and n - i > 3:
                stack.append((q, ang + gen.choice([-1.0, 1.0]) * gen.uniform(0.5, 1.1), (n - i) // 2))
            p = q
    width = 2 if size >= 128 and gen.random() < 0.5 else 1
    alpha = _draw_lines(size, segs, width) * gen.uniform(0.85, 1.0)
    return clean.astype(np.float32) * 0.22, alpha


def _hole(gen, clean, support):
    size = clean.shape[0]
    a = size * gen.uniform(0.02, 0.11)
    b = a * gen.uniform(0.6, 1.0)
    rot, lit_dir = gen.uniform(0, math.pi), gen.uniform(0, 2 * math.pi)
    cy, cx = _pick_point(gen, support)
    yy, xx = _grid(size)
    dy, dx = yy - cy, xx - cx
    u = (dx * math.cos(rot) + dy * math.sin(rot)) / a
    v = (-dx * math.sin(rot) + dy * math.cos(rot)) / b
    rho = np.hypot(u, v)
    alpha = np.clip((1 - rho) * b + 0.5, 0, 1)
    inside = alpha > 0
    mean = clean[inside].astype(np.float32).mean(axis=0)
    lit = np.clip(-(u * math.cos(lit_dir) + v * math.sin(lit_dir)), 0, 1) * np.clip(rho, 0, 1)
    target = mean * 0.12 + mean * 0.4 * lit[..., None]  # dark pit, far inner wall catches light
    return np.broadcast_to(target, clean.shape), alpha


_TINTS = (  # multiplicative colour shift of a stain: rust, oil, ink, bleach
    (1.08, 0.74, 0.46),
    (0.55, 0.55, 0.62),
    (0.62, 0.72, 1.15),
    (1.3, 1.28, 1.2),
)


def _stain(gen, clean, support):
    size = clean.shape[0]
    radius = size * gen.uniform(0.04, 0.2)
    cy, cx = _pick_point(gen, support)
    yy, xx = _grid(size)
    field = np.zeros((size, size), np.float32)
    for _ in range(int(gen.integers(3, 7))):
        oy, ox = gen.normal(0, radius * 0.45, 2)
        sigma = radius * gen.uniform(0.35, 0.6)
        field += np.exp(-((yy - cy - oy) ** 2 + (xx - cx - ox) ** 2) / (2 * sigma**2))
    t = gen.uniform(0.35, 0.55)
    span = max(float(field.max()) - t, 1e-6)
    alpha = np.where(field > t, 0.45 + 0.4 * np.clip((field - t) / span, 0, 1), 0.0)
    tint = np.asarray(_TINTS[int(gen.integers(0, len(_TINTS)))], np.float32)
    return clean.astype(np.float32) * tint, alpha


_SURFACE = {"scratch": _scratch, "crack": _crack, "hole": _hole, "stain": _stain}


def _apply_defect(gen: np.random.Generator, normal: Normal, defect: str) -> np.ndarray:
    """The defective image for one attempt (may change no pixel; the caller retries)."""
    clean = normal.image
    size = clean.shape[0]
    if defect == "missing":
        return normal.redraw(missing=(gen.uniform(0, 2 * math.pi), size * gen.uniform(0.05, 0.16)))
    if defect == "displaced":
        sign = gen.choice([-1.0, 1.0])
        dot, turn = int(gen.integers(0, 6)), sign * gen.uniform(0.2, 0.45)  # neighbours are 1.05 rad apart
        return normal.redraw(displaced=(dot, turn, size * gen.uniform(-0.03, 0.03)))
    target, alpha = _SURFACE[defect](gen, clean, normal.support)
    alpha = alpha * normal.support
    region = alpha > 0
    c = clean.astype(np.float32)
    out = _u8(c * (1 - alpha[..., None]) + np.asarray(target, np.float32) * alpha[..., None])
    same = region & np.all(out == clean, axis=-1)  # too faint to change: make every region pixel differ
    push = np.where(clean[same] >= 128, -24, 24)
    out[same] = (clean[same].astype(np.int16) + push).astype(np.uint8)
    return out


def render_normal(category: str, split: str, defect: str, index: int, image_size: int, seed: int):
    """The clean image (and its generator state) for one file of the demo dataset."""
    gen = make_rng(seed, "demo", category, split, defect, index)
    return GENERATORS[category].render(gen, image_size), gen


def render_test_image(category: str, defect: str, index: int, image_size: int, seed: int):
    """``(clean, image, mask)`` of ``test/<defect>/<index:03d>.png``; mask is None for ``good``.

    ``mask == (image != clean).any(-1)`` holds exactly for every defect image.
    """
    normal, gen = render_normal(category, "test", defect, index, image_size, seed)
    if defect == "good":
        return normal.image, normal.image, None
    min_pixels = max(3, image_size * image_size // 4096)
    for _ in range(50):
        image = _apply_defect(gen, normal, defect)
        mask = np.any(image != normal.image, axis=-1)
        if mask.sum() >= min_pixels:
            return normal.image, image, mask
    raise RuntimeError(f"demo {category}/{defect}/{index}: no visible defect after 50 draws")


def defect_counts(category: str, n_test: int) -> dict[str, int]:
    """Images per test folder: ``n_test // 2`` defects spread round-robin over the kinds."""
    defects = GENERATORS[category].defects
    n_bad = n_test // 2
    counts = {"good": n_test - n_bad}
    for i, d in enumerate(defects):
        counts[d] = n_bad // len(defects) + (1 if i < n_bad % len(defects) else 0)
    return {k: v for k, v in counts.items() if v > 0}


def _save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")


def _write_category(dst: Path, category: str, image_size: int, n_train: int, n_test: int, seed: int) -> dict:
    for j in range(n_train):
        normal, _ = render_normal(category, "train", "good", j, image_size, seed)
        _save_png(dst / "train" / "good" / f"{j:03d}.png", normal.image)
    layout = defect_counts(category, n_test)
    for defect, count in layout.items():
        for j in range(count):
            _, image, mask = render_test_image(category, defect, j, image_size, seed)
            _save_png(dst / "test" / defect / f"{j:03d}.png", image)
            if mask is not None:
                _save_png(dst / "ground_truth" / defect / f"{j:03d}_mask.png", mask.astype(np.uint8) * 255)
    return {"train": n_train, "test": layout}


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def generate_demo(
    root: str | Path,
    categories: tuple[str, ...] | list[str] = DEFAULT_CATEGORIES,
    image_size: int = 256,
    n_train: int = 20,
    n_test: int = 60,
    seed: int = 0,
) -> Path:
    """Write the demo dataset to ``root`` (MVTec layout) and return ``root``.

    Does nothing when ``root/.complete`` records the same parameters. Refuses to replace a
    non-empty ``root`` that holds neither the marker nor the ``.anorefiner-demo`` tag (not ours).
    """
    categories = list(categories)
    unknown = [c for c in categories if c not in GENERATORS]
    if unknown or not categories:
        raise ValueError(f"unknown demo categories {unknown}; available: {', '.join(sorted(GENERATORS))}")
    if len(set(categories)) != len(categories):
        raise ValueError(f"demo categories repeat a name: {categories}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"demo image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    if n_train < 1 or n_test < 2:
        raise ValueError(f"demo needs n_train >= 1 and n_test >= 2, got n_train={n_train}, n_test={n_test}")
    params = {"format": FORMAT_VERSION, "categories": categories, "image_size": int(image_size),
              "n_train": int(n_train), "n_test": int(n_test), "seed": int(seed)}
    root = Path(root)
    marker = _read_marker(root / MARKER)
    if marker is not None and marker.get("params") == params:
        LOG.info("demo dataset %s is complete (same parameters); nothing to do", root)
        return root
    ours = marker is not None or (root / OWNER_TAG).is_file()
    if root.exists() and not ours and any(root.iterdir()):
        raise ValueError(
            f"{root} is not empty and has no {MARKER} marker of a demo dataset; refusing to overwrite it"
        )

    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by a killed run
    partial.mkdir(parents=True)
    counts = {}
    for category in progress(categories, desc="demo categories"):
        counts[category] = _write_category(partial / category, category, image_size, n_train, n_test, seed)
    (partial / OWNER_TAG).write_text("generated by anorefiner demo-data; may be replaced\n")
    write_json_atomic(partial / MARKER, {"params": params, "counts": counts})

    if root.exists():
        old = root.with_name(root.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        root.rename(old)
        partial.rename(root)
        shutil.rmtree(old)
    else:
        partial.rename(root)
    LOG.info("demo dataset written to %s (%s)", root, ", ".join(categories))
    return root
