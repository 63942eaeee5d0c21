"""PA-CLIP's PAD and PAM on top of another CLIP backend (PA-CLIP Tables 5-6, "AdaCLIP/AnomalyCLIP +PAD+PAM").

The paper gives one sentence ("we apply our PAD and PAM components to other CLIP-based methods",
papers/pa-clip.txt, "Generalization to Other CLIP-based Methods") and no code. This project's reading,
every choice an option of :class:`PadPamConfig`:

* **features**: PAM's memory banks and PAD's distances run on the patch features the base method
  itself scores (AnomalyCLIP: the DPAM path after ``ln_post`` and ``proj``; AdaCLIP: its per-layer patch
  heads), taken from the base's ``features_and_scores`` (the base runs its own forward on the images);
* **normal images** (PA-CLIP Sec. 3.2 selects them by CLS-text similarity): the top ``normal_ratio`` of
  the category by the *base's* normal probability, i.e. the lowest base image scores; the base's
  learned text is the CLIP text the method owns;
* **PAM's content-adaptive augmentation** (CADA): the augmented normal images go through the base's
  forward too, so the normal bank lives in the base's feature space;
* **decision**: ``base_weight * mm(base map) + (1 - base_weight) * mm(PAD map)`` with ``mm`` the min-max over
  the category's maps (so both terms share one scale), and the same fusion of the image scores. The
  default 0.5 weighs the method and the modules equally; ``base_weight: 0`` keeps PAD's map alone.

The fusion uses category-wide statistics: a map depends on the other test images of its category, as
PA-CLIP's own mutual scoring does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from ...log import LOG
from ..maps import minmax
from ..paclip.backend import PACLIPBackend, PACLIPConfig

#: base backend types that expose ``features_and_scores(indices) -> (layers, maps, scores)``
BASE_TYPES = ("anomalyclip", "adaclip")


@dataclass
class PadPamConfig:
    """Options of a ``pad_pam`` backend (config ``backends.<name>``: ``base`` + ``options``)."""

    base_type: str = ""  # type of the base backend; the workflow passes the type of ``backends.<base>``
    base_options: dict = field(default_factory=dict)  # the base's options (checkpoint, ...); the workflow fills them
    paclip: PACLIPConfig = field(default_factory=PACLIPConfig)  # PA-CLIP's PAD/PAM settings (its defaults)
    base_weight: float = 0.5  # open: the paper does not say how PAD's map meets the method's; equal weights
    class_name: str = ""  # the category, passed on to a class-aware base (AdaCLIP)
    device: str = "auto"


def fuse(base: np.ndarray, pad: np.ndarray, base_weight: float) -> np.ndarray:
    """The decision rule above: a convex combination of the two arrays, each min-max normalised (float64)."""
    base, pad = np.asarray(base, np.float64), np.asarray(pad, np.float64)
    return (base_weight * minmax(base) + (1.0 - base_weight) * minmax(pad)).astype(np.float32)


class _BaseSelectedPACLIP(PACLIPBackend):
    """PA-CLIP whose normal images come from the base's image scores and whose augmented views are
    encoded by the base (see the module docstring)."""

    def __init__(self, config: PACLIPConfig, base, base_scores: np.ndarray, name: str, seed: int):
        super().__init__(config, backbone=None, name=name, seed=seed)
        self.base, self.base_scores = base, np.asarray(base_scores, dtype=np.float64)

    def selection_mode(self, feats) -> str:
        return "base"

    def normal_scores(self, feats, idx: np.ndarray) -> np.ndarray:
        return -self.base_scores[np.asarray(idx)]

    def _view_source(self):
        return self.base.images

    def _encode_views(self, images: list) -> dict:
        """The base's features of augmented images (its forward reads images through ``base.images``)."""
        source = self.base.images
        self.base.images = lambda idx: [images[i] for i in idx]
        try:
            layers, _, _ = self.base.features_and_scores(list(range(len(images))))
        finally:
            self.base.images = source
        return layers


class PadPamBackend:
    """``<base> +PAD+PAM`` as a :class:`~anorefiner.zsad.Backend` (scores images through its base)."""

    def __init__(self, config: PadPamConfig | None = None, backbone=None, name: str = "pad_pam", seed: int = 0):
        from ...config import from_dict
        from ..registry import backend_type

        self.config = c = config or PadPamConfig()
        self.backbone, self.name, self.seed = backbone, name, int(seed)
        if c.base_type not in BASE_TYPES:
            raise ValueError(f"pad_pam: option base_type must be one of {', '.join(BASE_TYPES)} "
                             f"(the backend PAD+PAM is applied to), got {c.base_type!r}")
        if not 0 <= c.base_weight <= 1:
            raise ValueError(f"pad_pam: option base_weight must lie in [0, 1], got {c.base_weight}")
        kind = backend_type(c.base_type)
        opts = dict(c.base_options)
        if kind.clip:
            opts.setdefault("device", c.device)
        if kind.class_name:
            opts.setdefault("class_name", c.class_name)
        backend_cls, config_cls = kind.classes()
        base_config = from_dict(config_cls, opts, f"backends.{name}.options.base_options")
        self.base = backend_cls(base_config, backbone=backbone, name=f"{name}.base", seed=seed)
        self.images = None
        self.last_info: dict = {}

    def coarse(self, feats):
        from .. import CoarseResult

        if self.images is None:
            raise ValueError(f"{self.name}: its base {self.config.base_type} scores images: the coarse stage "
                             "needs --data-root (the dataset folder)")
        n = len(feats.ids)
        if n < 2:
            raise ValueError(f"{self.name}: PAD needs at least 2 test images in the category, got {n}")
        self.base.images = self.images
        idx = list(range(n))
        layers, base_maps, base_scores = self.base.features_and_scores(idx)
        base_maps, base_scores = np.asarray(base_maps, np.float32), np.asarray(base_scores, np.float32)
        paclip = _BaseSelectedPACLIP(self.config.paclip, self.base, base_scores, f"{self.name}.pad", self.seed)
        ref = SimpleNamespace(layers={k: np.asarray(v) for k, v in layers.items()}, cls=None, ids=feats.ids)
        pad_maps = paclip._score(ref.layers, idx, ref, np.arange(n), report=True)
        flat = pad_maps.reshape(n, -1)
        pad_scores = flat.mean(1) if self.config.paclip.image_score == "mean" else flat.max(1)
        w = self.config.base_weight
        if base_maps.shape != pad_maps.shape:
            raise ValueError(f"{self.name}: base maps {base_maps.shape} and PAD maps {pad_maps.shape} differ in shape")
        maps, scores = fuse(base_maps, pad_maps, w), fuse(base_scores, pad_scores, w)
        self.last_info = {"base_type": self.config.base_type, "base_weight": w,
                          "fusion": "base_weight*minmax_category(base) + (1-base_weight)*minmax_category(PAD)",
                          "base_info": getattr(self.base, "last_info", {}), "paclip_info": paclip.last_info}
        LOG.info("%s: %s +PAD+PAM on %d images (base weight %.2f)", self.name, self.config.base_type, n, w)
        return CoarseResult(maps=maps, scores=scores)

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude):
        raise NotImplementedError(f"{self.name}: its base scores images, so PGT cannot score cached features with it")
