"""AA-CLIP (CVPR 2025): anomaly-aware text anchors and patch features through residual adapters.

Facts from ``Mwxinnn/AA-CLIP@53db195`` (adapters and forwards: :mod:`.model`; prompts: :mod:`.prompts`):

* text anchors ``T [2, D]`` per class from the adapted text tower (``test.py`` l.192-199);
* per map level l (6/12/18/24) ``s_l = (100 cos(f_l, t_abn) + 1 - 100 cos(f_l, t_norm)) / 2`` on the token grid,
  kornia ``gaussian_blur2d`` with kernel 7 and sigma 1 (the "Industrial" domain of MVTec AD and VisA; 9 / 1.5 for
  medical data), bilinear upsampling to the input size (align_corners=True); the map is the sum over the levels
  (``forward_utils.py`` calculate_similarity_map l.196-216 with ``test=True``, ``test.py`` l.86-93);
* detection score ``(det @ t_abn + 1) / 2`` (``test.py`` l.83-84; ``det`` is a mean of unit vectors);
* per class (``forward_utils.py`` metrics_eval l.241-252): the maps are min-max normalised over the whole class
  stack, the detection scores over the class, and the image score is ``0.5 max(map) + 0.5 det`` of the normalised
  values (both normalisations apply whenever the maximum is not exactly 1, i.e. always).

Store choice (as :mod:`..vcp_clip`): token-grid maps, the area mean per patch of the official full-size map, the
class min-max applied with the stack's full-size min and max (option ``class_minmax``, recorded in ``last_info``):
a map and a score depend on the other test images of the category. The backend runs its own forward from the
images (the adapters change the visual stream), so PGT cannot refine it (``refinable`` False).

Checkpoint: ``{"text_adapter": state_dict, "image_adapter": state_dict, "meta": {...}}``, the official module
names (``train.py`` saves the two in ``text_adapter.pth`` and ``image_adapter_<epoch>.pth``). No official
weights are published, so the pipeline always trains them (:mod:`.train`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...log import LOG
from ..april_gan.backend import patch_map
from ..maps import resolve_device as _resolve_device
from .model import Adapters, adapted_visual, class_text, dims_of

PARTS = ("text_adapter", "image_adapter")
MAP_LEVEL = ("token grid: area mean per patch of the official full-size map (class min-max of the sum over levels "
             "of bilinear(blur((100 cos_abn + 1 - 100 cos_norm) / 2)))")


@dataclass
class AaClipConfig:
    """Options of the ``aa_clip`` backend (config ``backends.<name>.options``)."""

    checkpoint: str = ""  # trained adapters (rule train_backend)
    class_name: str = ""  # the category; the coarse stage passes it verbatim (REAL_NAMES keys)
    real_names: bool = True  # constants.py REAL_NAMES descriptions; False: the category name itself
    text_adapt_weight: float = 0.1  # test.py --text_adapt_weight
    image_adapt_weight: float = 0.1  # test.py --image_adapt_weight
    temperature: float = 100.0  # calculate_similarity_map: 100 * cos
    blur_kernel: int = 7  # calculate_similarity_map: 7 for the "Industrial" domain (9 medical)
    blur_sigma: float = 1.0  # 1 industrial (1.5 medical)
    image_weight: float = 0.5  # metrics_eval: 0.5 * max(map) + 0.5 * detection score (non-medical domains)
    class_minmax: bool = True  # metrics_eval min-max over the class stack (official); False: raw maps and scores
    map_size: int | None = None  # None = the backbone's input size (--img_size 518)
    batch_size: int = 8  # images per forward (memory only; the maps do not depend on it)
    device: str = "auto"  # filled by the pipeline; the forward runs where the backbone lives


def gaussian_blur(maps: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """kornia ``gaussian_blur2d(x, (k, k), (s, s))`` of ``[B, 1, h, w]``: the normalised kernel
    ``exp(-x^2 / 2 s^2)``, ``x = -(k // 2) .. k // 2``, separable, border ``reflect`` (edge not repeated)."""
    if kernel < 1 or kernel % 2 == 0 or sigma <= 0:
        raise ValueError(f"aa_clip: blur_kernel must be odd and >= 1, blur_sigma > 0 (got {kernel}, {sigma})")
    r = kernel // 2
    if r >= min(maps.shape[-2:]):
        raise ValueError(f"aa_clip: blur_kernel {kernel} needs a token grid larger than {r}, got "
                         f"{tuple(maps.shape[-2:])}")
    x = torch.arange(kernel, dtype=maps.dtype, device=maps.device) - r
    g = torch.exp(-(x ** 2) / (2 * float(sigma) ** 2))
    g = g / g.sum()
    out = F.pad(maps, (r, r, r, r), mode="reflect")
    out = F.conv2d(out, g.reshape(1, 1, 1, kernel))
    return F.conv2d(out, g.reshape(1, 1, kernel, 1))


def level_map(seg: torch.Tensor, text: torch.Tensor, grid: tuple[int, int], temperature: float = 100.0,
              kernel: int = 7, sigma: float = 1.0) -> torch.Tensor:
    """``[B, h*w, D]`` unit tokens, ``[2, D]`` text -> the blurred token-grid score ``[B, 1, h, w]``."""
    s = temperature * seg @ text.to(seg.dtype).T
    s = (s[..., 1] + 1 - s[..., 0]) / 2
    return gaussian_blur(s.reshape(seg.shape[0], 1, grid[0], grid[1]), kernel, sigma)


def full_map(seg: list[torch.Tensor], text: torch.Tensor, grid: tuple[int, int], size: int,
             temperature: float = 100.0, kernel: int = 7, sigma: float = 1.0) -> torch.Tensor:
    """The official map ``[B, size, size]``: sum over levels of the upsampled (align_corners=True) scores."""
    return sum(F.interpolate(level_map(f, text, grid, temperature, kernel, sigma), size=(size, size),
                             mode="bilinear", align_corners=True)[:, 0] for f in seg)


def detection_scores(det: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``(det @ t_abn + 1) / 2`` per image."""
    return (det @ text.to(det.dtype)[1] + 1) / 2


def class_scores(map_max: np.ndarray, det: np.ndarray, lo: float, hi: float, image_weight: float = 0.5,
                 normalise: bool = True) -> np.ndarray:
    """metrics_eval's image score: ``w * minmax_class(max map) + (1 - w) * minmax_class(det)``; the maps' min
    and max are the whole stack's (full size)."""
    from ..maps import minmax

    if normalise:
        map_max = (map_max - lo) / (hi - lo) if hi > lo else np.zeros_like(map_max)
        det = minmax(det)
    return image_weight * map_max + (1 - image_weight) * det


def _count(state: dict, prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in state):
        n += 1
    return n


def load_adapters(path: str | Path, backbone=None) -> tuple[Adapters, dict]:
    """``(adapters, meta)`` of a checkpoint; the adapter counts and the ``relu`` switch are read from its keys, the
    widths from the backbone (or the file); every key and shape is checked, errors name the file and the key."""
    from ..checkpoints import check_state, load_weights_only

    path = Path(path)
    obj = load_weights_only(path, "aa_clip checkpoint")
    if not isinstance(obj, dict) or any(not isinstance(obj.get(k), dict) for k in PARTS):
        keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"aa_clip checkpoint {path}: needs the state dicts {PARTS} (top-level keys: {keys})")
    image, text = obj["image_adapter"], obj["text_adapter"]
    try:
        relu = "det_proj.fc.0.weight" in image
        w_det = image["det_proj.fc.0.weight" if relu else "det_proj.fc.weight"]
        w_txt = text[f"{_count(text, '') - 1}.fc.0.weight"]
    except KeyError as err:
        raise ValueError(f"aa_clip checkpoint {path}: missing key {err}") from None
    width, text_width, embed = (dims_of(backbone) if backbone is not None
                                else (int(w_det.shape[1]), int(w_txt.shape[1]), int(w_det.shape[0])))
    with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the global RNG
        model = Adapters(width, text_width, embed, _count(image, "seg_proj."), _count(image, "layer_adapters."),
                         _count(text, "") - 1, relu)
    for part in PARTS:
        check_state(path, "aa_clip checkpoint", getattr(model, part).state_dict(), obj[part], part,
                    f" (vision width {width}, text width {text_width}, embed {embed})")
        getattr(model, part).load_state_dict({k: v.float() for k, v in obj[part].items()})
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    return model.eval().requires_grad_(False), meta


class AaClipBackend:
    """AA-CLIP maps and scores as a :class:`~anorefiner.zsad.Backend` (scores the images, not cached tokens).

    ``images``: ``indices -> list of uint8 [H,W,3]`` test images (set by the coarse stage).
    """

    def __init__(self, config: AaClipConfig | None = None, backbone=None, name: str = "aa_clip", seed: int = 0,
                 images=None):
        self.config = c = config or AaClipConfig()
        self.backbone, self.name, self.seed, self.images = backbone, name, int(seed), images
        if backbone is None or not hasattr(backbone, "blocks") or not hasattr(backbone, "model"):
            raise ValueError("aa_clip needs the open_clip ViT backbone (ViT-L-14-336 at 518): pass --backbone")
        if not c.checkpoint:
            raise ValueError("aa_clip needs option 'checkpoint' (the adapters trained by rule train_backend)")
        if not 0 <= c.image_weight <= 1 or c.batch_size < 1:
            raise ValueError(f"aa_clip: image_weight must lie in [0, 1] and batch_size be >= 1 "
                             f"(got {c.image_weight}, {c.batch_size})")
        self.adapters, meta = load_adapters(c.checkpoint, backbone)
        self.adapters.to(backbone.device)
        for key in ("text_adapt_weight", "image_adapt_weight", "real_names"):
            if key in meta and meta[key] != getattr(c, key):
                raise ValueError(f"aa_clip checkpoint {c.checkpoint} was trained with {key}={meta[key]}, option "
                                 f"{key} is {getattr(c, key)}")
        self.levels = [int(v) for v in backbone.layers]
        if self.levels != sorted(self.levels):
            raise ValueError(f"aa_clip: the backbone's layers {self.levels} must be ascending (the last is det_proj's)")
        self.device = getattr(backbone, "device", None) or _resolve_device(c.device)
        with torch.no_grad():
            self.text = class_text(backbone, self.adapters, c.class_name, c.text_adapt_weight, c.real_names)
        self.map_size = int(c.map_size or backbone.resolution)
        self.last_info = {"map_level": MAP_LEVEL, "map_size": self.map_size, "levels": self.levels,
                          "checkpoint": str(c.checkpoint), "class_minmax": bool(c.class_minmax),
                          "image_weight": c.image_weight, "blur": [c.blur_kernel, c.blur_sigma]}

    def score_batch(self, batch: torch.Tensor) -> dict:
        """Preprocessed images -> ``full`` maps ``[B,S,S]`` (before the class min-max), token-grid ``maps``,
        per-image map maxima ``max`` and detection scores ``det``."""
        c, grid = self.config, self.backbone.grid
        with torch.no_grad():
            seg, det = adapted_visual(self.backbone, self.adapters, batch, self.levels, c.image_adapt_weight)
            full = full_map(seg, self.text, grid, self.map_size, c.temperature, c.blur_kernel, c.blur_sigma).float()
            return {"full": full.cpu(), "maps": patch_map(full, grid).cpu(), "max": full.flatten(1).max(1).values.cpu(),
                    "det": detection_scores(det, self.text).float().cpu()}

    def coarse(self, feats):
        from .. import CoarseResult
        from ...log import progress

        n = len(feats.ids)
        if self.images is None:
            raise ValueError("aa_clip scores images: the coarse stage needs --data-root (the dataset folder)")
        if n == 0:
            raise ValueError("aa_clip: no images to score (empty category)")
        bs = self.config.batch_size
        out = [self.score_batch(self.backbone.preprocess(self.images(list(range(a, min(a + bs, n))))))
               for a in progress(range(0, n, bs), desc=self.name, unit="batch")]
        maps = torch.cat([o["maps"] for o in out]).numpy().astype(np.float64)
        top = torch.cat([o["max"] for o in out]).numpy().astype(np.float64)
        det = torch.cat([o["det"] for o in out]).numpy().astype(np.float64)
        lo, hi = min(float(o["full"].min()) for o in out), max(float(o["full"].max()) for o in out)
        scores = class_scores(top, det, lo, hi, self.config.image_weight, self.config.class_minmax)
        if self.config.class_minmax:
            if not hi > lo:
                LOG.warning("aa_clip: constant maps over the class stack (min = max = %g); maps set to 0", lo)
            maps = (maps - lo) / (hi - lo) if hi > lo else np.zeros_like(maps)
        self.last_info.update({"stack_min": lo, "stack_max": hi, "n_images": n})
        LOG.info("aa_clip: %d images, levels %s (%s, class min-max %s)", n, self.levels, MAP_LEVEL,
                 self.config.class_minmax)
        return CoarseResult(maps=maps.astype(np.float32), scores=scores.astype(np.float32))

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude):
        raise NotImplementedError(
            "aa_clip scores images (its adapters change the visual stream from block 1), so PGT cannot score "
            "pseudo-anomalies from cached tokens; refine another backend's maps")
