"""Evaluate the methods of one category: image and pixel metrics, PRO, at one evaluation resolution.

Metric names (docs/architecture.md, "Stores"): ``image_auroc, image_ap, image_f1_max,
pixel_auroc, pixel_ap, pixel_f1_max, pixel_pro``. The resolution and the mask resizing rule change
pixel metrics (methods.md, "Metric conventions"), so both are explicit options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anorefiner.log import LOG
from anorefiner.metrics.curves import binary_metrics, to_numpy
from anorefiner.metrics.image import image_metrics, validate_labels
from anorefiner.metrics.pixel import component_weights, prepare_pixels
from anorefiner.metrics.pro import PRO_VARIANTS, check_pro_options, pro_from_pixels

METRIC_NAMES = (
    "image_auroc", "image_ap", "image_f1_max",
    "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_pro",
)
MASK_RESIZE = ("nearest", "bilinear_cast")
_CHUNK = 16  # images resized at once: bounds the float32 temporaries


@dataclass
class EvalConfig:
    """Options of ``evaluate_category`` (config section ``evaluation``)."""

    # MuSc's protocol (which the paper follows) evaluates at 518 x 518; None keeps the masks' size.
    resolution: int | None = 518
    # "nearest": nearest-neighbour (pixel centres) then > 0.5, keeps mask borders (methods.md
    # default). "bilinear_cast": MuSc's bilinear resize then cast, only exact 1.0 survives.
    mask_resize: str = "nearest"
    # The paper reports MuSc's numbers, so its PRO protocol by default; "mvtec" = AU-PRO.
    pro_variant: str = "musc"
    compute_pro: bool = True
    # 8-connectivity: MVTec's evaluation code and skimage.measure.label (MuSc) both use it.
    pro_connectivity: int = 8
    # Both PRO protocols integrate up to FPR 0.3.
    pro_max_fpr: float = 0.3
    # MuSc's threshold count (used by pro_variant "musc" only).
    pro_steps: int = 200
    # MuSc upsamples patch-level maps with align_corners=True (methods.md, MSM).
    align_corners: bool = True
    # "cpu", "cuda" or "auto": where the pixel ranking runs; the numbers are identical (exact ties).
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 1):
            raise ValueError(f"evaluation.resolution must be a positive int or None, got {self.resolution!r}")
        if self.mask_resize not in MASK_RESIZE:
            raise ValueError(f"evaluation.mask_resize must be one of {MASK_RESIZE}, got {self.mask_resize!r}")
        if self.pro_variant not in PRO_VARIANTS:
            raise ValueError(f"evaluation.pro_variant must be one of {PRO_VARIANTS}, got {self.pro_variant!r}")
        if self.pro_connectivity not in (4, 8):
            raise ValueError(f"evaluation.pro_connectivity must be 4 or 8, got {self.pro_connectivity!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"evaluation.device must be cpu, cuda or auto, got {self.device!r}")
        check_pro_options(self.pro_variant, self.pro_max_fpr, self.pro_steps)


def resize_maps(maps: Any, size: tuple[int, int], align_corners: bool = True) -> np.ndarray:
    """Bilinear resize of ``maps [N,h,w]`` to ``size``; unchanged (same dtype) when already there."""
    arr = to_numpy(maps, "maps")
    if arr.ndim != 3:
        raise ValueError(f"maps must be [N,h,w], got shape {arr.shape}")
    if arr.shape[1:] == tuple(size):
        return arr
    out = np.empty((arr.shape[0], *size), dtype=np.float32)
    for s in range(0, arr.shape[0], _CHUNK):
        block = torch.from_numpy(np.ascontiguousarray(arr[s : s + _CHUNK], dtype=np.float32))
        up = F.interpolate(block[:, None], size=size, mode="bilinear", align_corners=align_corners)
        out[s : s + _CHUNK] = up[:, 0].numpy()
    return out


def resize_masks(masks: Any, size: tuple[int, int], rule: str = "nearest") -> np.ndarray:
    """Resize bool ``masks [N,H,W]`` to ``size`` with rule ``"nearest"`` or ``"bilinear_cast"``.

    ``"nearest"``: nearest neighbour on pixel centres (``nearest-exact``, as PIL's NEAREST), then
    ``> 0.5``. ``"bilinear_cast"`` emulates MuSc's PIL pipeline: antialiased bilinear resize of the
    0/255 mask, rounded to uint8 as PIL stores it, ``ToTensor`` then an int cast: only pixels that
    stay exactly 255 (1.0) survive, which shrinks mask borders. torch's antialiased bilinear
    follows PIL's filter; its rounding may differ from PIL's fixed-point arithmetic by one level.
    """
    if rule not in MASK_RESIZE:
        raise ValueError(f"mask_resize must be one of {MASK_RESIZE}, got {rule!r}")
    arr = to_numpy(masks, "masks")
    if arr.ndim != 3:
        raise ValueError(f"masks must be [N,H,W], got shape {arr.shape}")
    arr = arr.astype(bool, copy=False)
    if arr.shape[1:] == tuple(size):
        return arr
    out = np.empty((arr.shape[0], *size), dtype=bool)
    for s in range(0, arr.shape[0], _CHUNK):
        block = torch.from_numpy(arr[s : s + _CHUNK].astype(np.float32))[:, None]
        if rule == "nearest":
            out[s : s + _CHUNK] = (F.interpolate(block, size=size, mode="nearest-exact") > 0.5)[:, 0].numpy()
        else:
            up = F.interpolate(block * 255.0, size=size, mode="bilinear", align_corners=False, antialias=True)
            out[s : s + _CHUNK] = (torch.round(up) >= 255.0)[:, 0].numpy()
    return out


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("evaluation.device is 'cuda' but no CUDA device is available")
    return name


def evaluate_category(
    methods: dict[str, tuple[Any, Any]],
    masks: Any,
    labels: Any,
    options: EvalConfig | None = None,
) -> list[dict[str, Any]]:
    """Metrics of every method of one category as tidy rows ``{method, metric, value}``.

    ``methods``: name -> (maps ``[N,h,w]`` at any resolution, image scores ``[N]``); ``masks``
    ``[N,H,W]`` bool ground truth at its original resolution; ``labels`` ``[N]`` (1 = anomalous).
    Maps are resized bilinearly and masks by ``options.mask_resize`` to ``options.resolution``
    (None: the masks' size). Undefined metrics are NaN with a logged warning (see
    ``pixel_metrics``/``pro``). Image scores come from the methods, never from the maps.
    """
    options = options or EvalConfig()
    if not methods:
        raise ValueError("evaluate_category: no methods to evaluate")
    gt = to_numpy(masks, "masks")
    y = validate_labels(to_numpy(labels, "labels"))
    if gt.ndim != 3 or y.shape != (gt.shape[0],):
        raise ValueError(f"masks must be [N,H,W] and labels [N]: masks {gt.shape}, labels {y.shape}")
    size = (options.resolution,) * 2 if options.resolution is not None else gt.shape[1:]
    gt = resize_masks(gt, size, options.mask_resize)
    if gt[~y].any():
        LOG.warning("%d images labelled normal have anomalous mask pixels", int(gt[~y].any(axis=(1, 2)).sum()))
    components = component_weights(gt, options.pro_connectivity) if options.compute_pro else None
    device = _device(options.device)
    gt_dev = torch.from_numpy(gt).to(device) if device != "cpu" else gt
    rows: list[dict[str, Any]] = []
    for name, pair in methods.items():
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(f"method {name!r}: expected a (maps, scores) tuple")
        maps, scores = pair
        n_maps, n_scores = len(maps), len(scores)
        if n_maps != gt.shape[0] or n_scores != gt.shape[0]:
            raise ValueError(
                f"method {name!r}: {n_maps} maps and {n_scores} scores for {gt.shape[0]} masks/labels"
            )
        try:
            values = {f"image_{k}": v for k, v in image_metrics(scores, y).items()}
            resized = resize_maps(maps, size, options.align_corners)
            if device != "cpu":
                resized = torch.from_numpy(resized).to(device)
            px = prepare_pixels(
                resized, gt_dev, keep_sorted=options.compute_pro and options.pro_variant == "musc",
                components=components,
            )
        except ValueError as err:
            raise ValueError(f"method {name!r}: {err}") from err
        del resized
        values.update({f"pixel_{k}": v for k, v in binary_metrics(px.ranked, what=f"{name} pixels").items()})
        if options.compute_pro:
            values["pixel_pro"] = pro_from_pixels(px, options.pro_variant, options.pro_max_fpr, options.pro_steps)
        del px
        rows.extend({"method": name, "metric": m, "value": float(values[m])} for m in METRIC_NAMES if m in values)
    return rows
