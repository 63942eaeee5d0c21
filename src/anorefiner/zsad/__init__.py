"""Zero-shot anomaly detection backends, the coarse store and BYO maps.

Layout: one package per method, named after its paper, as anomalib keeps ``models/image/<name>/``
(``musc``, ``paclip``, ``pad_pam``, ``winclip``, ``april_gan``, ``vcp_clip``, ``rareclip``, ``adaclip``,
``anomalyclip``, ``aa_clip``, ``bayes_pfl``, the few-shot ``promptad``, ``mvfa_ad`` and ``regad``, and ``byo`` for maps of any other
method). Each holds ``backend.py`` (the backend class and its options), the method's own parts beside it
(``prompts.py``, ``memory.py``, ``dpam.py``, ...) and, for a trained method, ``train.py`` (rule ``train_backend``,
or ``train_fewshot`` for the few-shot ones); its ``__init__`` exports the public names. The
modules at this top level are the machinery every method shares, never one method's parts:

* :mod:`.registry`: the backend types, the one place a backend is added (``anorefiner list backends``);
* :mod:`.store`: the coarse store (maps and scores of one backend on one category);
* :mod:`.checkpoints`: official checkpoints, their download and checks, training provenance;
* :mod:`.prompts`: CLIP prompt ensembles and cached text embeddings;
* :mod:`.groups`: the groups of test images scored (and refined) together;
* :mod:`.shots`: the few-shot methods' seeded ``train/good`` shots and their augmentations;
* :mod:`.maps`: small helpers (a backend's device, tensors from cached arrays, Gaussian smoothing, min-max).

A method package may import another method's package (VCP-CLIP, RareCLIP and AdaCLIP build on APRIL-GAN's
adapters and trainer), and the shared modules, never this package's ``__init__`` at import time.

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
``vcp_clip``    vcp_clip  VCP-CLIP (prompts, Pre-/Post-VCP trained on the auxiliary dataset)
``rareclip``    rareclip  RareCLIP (text adapters trained on the auxiliary dataset; online rarity memory)
``adaclip``     adaclip   AdaCLIP (hybrid prompts and heads trained on the auxiliary dataset; scores images)
``anomalyclip`` anomalyclip AnomalyCLIP (object-agnostic prompts trained on the auxiliary dataset; DPAM forward)
``aa_clip``     aa_clip   AA-CLIP (text and image adapters trained on the auxiliary dataset; scores images)
``bayes_pfl``   bayes_pfl Bayes-PFL (prompt flows trained on the auxiliary dataset; Monte-Carlo text samples)
``pad_pam``     pad_pam   PA-CLIP's PAD+PAM on an AnomalyCLIP/AdaCLIP base (options ``base_type``, ``base_options``)
``promptad``    promptad  PromptAD (prompts trained on k seeded train/good shots; ``k_shot: 0`` = text only)
``mvfa_ad``     mvfa_ad   MVFA-AD (residual adapters trained on k seeded train/good shots, shot memory)
``regad``       regad     RegAD (STN ResNet-18 trained on the other categories, k-shot Gaussian at test)
==============  ========  =============================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..config import from_dict
from .registry import BACKEND_TYPES, backend_type

TYPES = tuple(BACKEND_TYPES)
PRESETS = {
    "musc": ("musc", {}),
    "musc_star": ("musc", {"group_size": 30}),
    "musc_cnn": ("musc", {"rscin": False}),
    "paclip": ("paclip", {}),
    "byo": ("byo", {}),
    "april_gan": ("april_gan", {}),
    "winclip": ("winclip", {}),
    "vcp_clip": ("vcp_clip", {}),
    "rareclip": ("rareclip", {}),
    "adaclip": ("adaclip", {}),
    "anomalyclip": ("anomalyclip", {}),
    "aa_clip": ("aa_clip", {}),
    "bayes_pfl": ("bayes_pfl", {}),
    "pad_pam": ("pad_pam", {}),
    "promptad": ("promptad", {}),
    "mvfa_ad": ("mvfa_ad", {}),
    "regad": ("regad", {}),
}


def preset_options(name: str, kind: str) -> dict:
    """The options preset ``name`` sets when it names a backend of type ``kind`` (``backends.<name>.type``), else
    none: ``get_backend`` applies them under the config's own options."""
    return dict(PRESETS[name][1]) if PRESETS.get(name, (None,))[0] == kind else {}


def seed_dependent_backend(name: str, kind: str, options: dict) -> bool:
    """Whether backend ``name`` of type ``kind`` with ``options`` (over its preset's) gives different maps for
    different seeds (:func:`.registry.seed_dependent`; MuSc*'s groups are drawn with the seed)."""
    from .registry import seed_dependent

    return seed_dependent(kind, {**preset_options(name, kind), **(options or {})})


def preset_names(types=None) -> list[str]:
    """The preset names (``--backend`` values) of the given backend types (default: all), in preset order."""
    return [name for name, (kind, _) in PRESETS.items() if types is None or kind in types]


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
            f"unknown zero-shot backend {name_or_type!r}; known: {', '.join(PRESETS)}"
        )
    kind, preset = PRESETS[name_or_type]
    opts = {**preset, **dict(options or {})}
    backend_cls, config_cls = backend_type(kind).classes()
    config = from_dict(config_cls, opts, f"backends.{name_or_type}.options")
    return backend_cls(config, backbone=backbone, name=name_or_type, seed=seed)
