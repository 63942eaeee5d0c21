"""Zero-shot anomaly detection backends, the coarse store and BYO maps.

``get_backend(name_or_type, options, backbone=None)`` returns an object with the
:class:`Backend` protocol (docs/architecture.md). Names (config ``backends.<name>``) map to a
type plus preset options; ``options`` override the preset:

==============  ========  =============================================
name            type      preset
==============  ========  =============================================
``musc``        musc      whole test set (MuSc Table 1)
``musc_star``   musc      ``group_size=30`` (AnoRefiner Table 1 "MuSc*")
``musc_cnn``    musc      ``rscin=False`` (AnoRefiner Table 8, CNN features)
``paclip``      paclip    PA-CLIP defaults
``byo``         byo       user maps; MuSc proxy for pseudo-anomalies
``april_gan``   april_gan APRIL-GAN zero-shot (adapters trained on the auxiliary dataset)
``winclip``     winclip   WinCLIP zero-shot (``k_shot: 4`` for its 4-shot mode)
==============  ========  =============================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..config import from_dict

TYPES = ("musc", "paclip", "byo", "april_gan", "winclip")
PRESETS = {
    "musc": ("musc", {}),
    "musc_star": ("musc", {"group_size": 30}),
    "musc_cnn": ("musc", {"rscin": False}),
    "paclip": ("paclip", {}),
    "byo": ("byo", {}),
    "april_gan": ("april_gan", {}),
    "winclip": ("winclip", {}),
}


@dataclass
class CoarseResult:
    """Output of :meth:`Backend.coarse`: patch-level maps ``[N,h,w]`` and image scores ``[N]``."""

    maps: np.ndarray
    scores: np.ndarray


class Backend(Protocol):
    name: str

    def coarse(self, feats) -> CoarseResult: ...

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude): ...


def get_backend(name_or_type: str, options: dict | None = None, backbone=None, seed: int = 0) -> Backend:
    """Build a backend by preset name or type; unknown option keys raise ``ConfigError``."""
    if name_or_type not in PRESETS:
        raise ValueError(
            f"unknown zero-shot backend {name_or_type!r}; known: {', '.join(PRESETS)} "
            "(vcp_clip and rareclip are not implemented)"
        )
    kind, preset = PRESETS[name_or_type]
    opts = {**preset, **dict(options or {})}
    where = f"backends.{name_or_type}.options"
    if kind == "musc":
        from .musc import MuscBackend, MuscConfig

        return MuscBackend(from_dict(MuscConfig, opts, where), name=name_or_type, seed=seed, backbone=backbone)
    if kind == "paclip":
        from .paclip import PACLIPBackend, PACLIPConfig

        return PACLIPBackend(from_dict(PACLIPConfig, opts, where), backbone=backbone, name=name_or_type, seed=seed)
    if kind == "april_gan":
        from .april_gan import AprilGanBackend, AprilGanConfig

        return AprilGanBackend(from_dict(AprilGanConfig, opts, where), backbone=backbone, name=name_or_type, seed=seed)
    if kind == "winclip":
        from .winclip import WinClipBackend, WinClipConfig

        return WinClipBackend(from_dict(WinClipConfig, opts, where), backbone=backbone, name=name_or_type, seed=seed)
    from .byo import ByoBackend, ByoConfig

    return ByoBackend(from_dict(ByoConfig, opts, where), name=name_or_type, seed=seed)
