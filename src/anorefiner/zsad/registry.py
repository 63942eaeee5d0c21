"""The zero-shot backend types: one entry per backend module, read by the library, the CLI and the workflow.

A backend type is one package under :mod:`anorefiner.zsad` (named after its paper) whose ``__init__``
exports a backend class (the :class:`~anorefiner.zsad.Backend` protocol) and its options dataclass. The
flags below say what the pipeline fills in or provides for it, so a new backend is added here and nowhere
else:

* ``clip``: runs on the CLIP backbone; the pipeline fills option ``device``.
* ``class_name``: uses the category name in its prompts; option ``class_name`` gets the category verbatim.
* ``text_cache``: caches its text embeddings in ``results/text`` (option ``text_cache``).
* ``images``: scores the test images themselves (its own forward pass); the coarse stage sets
  ``backend.images`` (``indices -> list of uint8 images``) when the data root is known.
* ``trainer``: module of its training, ``<package>.train`` (rule ``train_backend``); the workflow passes the
  trained or official checkpoint as option ``checkpoint``. A trainer module provides

  - ``TrainConfig``: the options of ``backends.<name>.train.<auxiliary dataset>``;
  - ``train_backend(backbone, root, dataset, config, out, *, text_cache=None) -> Path``: train on the
    auxiliary dataset's test split with masks under ``root`` and write the checkpoint atomically;
  - ``check_checkpoint(path, backbone=None) -> None``: raise ``ValueError`` naming the file and the key
    when the keys or shapes are not the backend's (official files are checked before they are used).
* ``train_scope``: what the trainer trains on. ``"auxiliary"``: the auxiliary dataset's test split with masks,
  one checkpoint per auxiliary dataset (rule ``train_backend``). The few-shot methods train per scored category
  (rule ``train_fewshot``, checkpoint ``results/checkpoints/<backend>/<dataset>/<category>/trained_<draw>.pt``):
  ``"shots"`` on the k ``train/good`` images drawn by the run's seed (``<draw>`` = ``seed<k>``), ``"others"`` on
  the ``train/good`` images of the dataset's *other* categories (``<draw>`` = ``others``). Their trainer module
  provides ``train_fewshot(backbone, root, dataset, category, config, out, *, k_shot, seed, categories,
  text_cache) -> Path`` instead of ``train_backend``.
* ``shots``: reads k ``train/good`` images of the scored category; the coarse stage sets ``backend.train_images``
  (:class:`~anorefiner.zsad.shots.TrainGood`) when the data root is known, and fills option ``device``.
* ``refinable``: PGT can refine its maps (it scores pseudo-anomaly features in ``score_queries``).
* ``tta``: :func:`anorefiner.tta.build_tta_backend` adapts its CLIP tower at test time (rule ``tta``,
  AnoRefiner Table 1 "+ TIPI/SAR/DeYO").
* ``pos_embed``: the position-embedding resize of the CLIP features its official code computes
  (:data:`anorefiner.backbones.clip_vit.POS_EMBED_RESIZE`): ``anorefiner run``'s default for an open_clip
  backbone, and what the workflow's backbone entry for it should set (``backbones.<key>.pos_embed``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class BackendType:
    module: str  # package anorefiner.zsad.<module>
    backend: str  # class name of the backend
    config: str  # class name of its options dataclass
    paper: str = ""  # the method's paper (``anorefiner list backends``, ``--help`` texts)
    clip: bool = False
    class_name: bool = False
    text_cache: bool = False
    images: bool = False
    trainer: str | None = None  # module anorefiner.zsad.<trainer>
    train_scope: str = "auxiliary"  # "auxiliary", "shots" or "others" (see the module docstring)
    shots: bool = False
    refinable: bool = True
    tta: bool = False
    pos_embed: str = "bicubic"

    def classes(self):
        """``(backend class, options dataclass)``."""
        mod = importlib.import_module(f"anorefiner.zsad.{self.module}")
        return getattr(mod, self.backend), getattr(mod, self.config)

    def trainer_module(self):
        if not self.trainer:
            raise ValueError(f"backend module {self.module!r} has no training")
        return importlib.import_module(f"anorefiner.zsad.{self.trainer}")


BACKEND_TYPES: dict[str, BackendType] = {
    # MuSc's vendored open_clip resizes without antialias (models/backbone/open_clip/model.py l.436-441)
    "musc": BackendType("musc", "MuscBackend", "MuscConfig", paper="MuSc (Li et al., ICLR 2024)", tta=True,
                        pos_embed="bicubic_no_antialias"),
    "paclip": BackendType("paclip", "PACLIPBackend", "PACLIPConfig", paper="PA-CLIP (pseudo-anomaly-aware CLIP)",
                          clip=True),
    "byo": BackendType("byo", "ByoBackend", "ByoConfig", paper="bring your own maps (from a file)"),
    "april_gan": BackendType("april_gan", "AprilGanBackend", "AprilGanConfig", paper="APRIL-GAN (VAND 2023)",
                             clip=True, class_name=True, text_cache=True, trainer="april_gan.train", tta=True),
    "vcp_clip": BackendType("vcp_clip", "VcpClipBackend", "VcpClipConfig", paper="VCP-CLIP (ECCV 2024)", clip=True,
                            trainer="vcp_clip.train", tta=True),
    "rareclip": BackendType("rareclip", "RareClipBackend", "RareClipConfig", paper="RareCLIP (ICCV 2025)", clip=True,
                            text_cache=True, trainer="rareclip.train"),
    "anomalyclip": BackendType("anomalyclip", "AnomalyCLIPBackend", "AnomalyCLIPConfig",
                               paper="AnomalyCLIP (ICLR 2024)", clip=True, images=True, trainer="anomalyclip.train",
                               refinable=False),
    "adaclip": BackendType("adaclip", "AdaClipBackend", "AdaClipConfig", paper="AdaCLIP (ECCV 2024)", clip=True,
                           class_name=True, images=True, trainer="adaclip.train", refinable=False),
    "aa_clip": BackendType("aa_clip", "AaClipBackend", "AaClipConfig", paper="AA-CLIP (CVPR 2025)", clip=True,
                           class_name=True, images=True, trainer="aa_clip.train", refinable=False),
    "bayes_pfl": BackendType("bayes_pfl", "BayesPflBackend", "BayesPflConfig", paper="Bayes-PFL (CVPR 2025)",
                             clip=True, class_name=True, trainer="bayes_pfl.train"),
    "pad_pam": BackendType("pad_pam", "PadPamBackend", "PadPamConfig",
                           paper="PA-CLIP's PAD+PAM on another CLIP method (PA-CLIP Tab. 5-6)", clip=True,
                           class_name=True, images=True, refinable=False),
    "winclip": BackendType("winclip", "WinClipBackend", "WinClipConfig", paper="WinCLIP (Jeong et al., CVPR 2023)",
                           clip=True, class_name=True, text_cache=True, images=True, refinable=False),
    "promptad": BackendType("promptad", "PromptADBackend", "PromptADConfig", paper="PromptAD (Li et al., CVPR 2024)",
                            clip=True, class_name=True, images=True, trainer="promptad.train", train_scope="shots",
                            shots=True, refinable=False),
    "mvfa_ad": BackendType("mvfa_ad", "MvfaBackend", "MvfaConfig", paper="MVFA-AD (Huang et al., CVPR 2024)",
                           clip=True, class_name=True, text_cache=True, images=True, trainer="mvfa_ad.train",
                           train_scope="shots", shots=True, refinable=False),
    "regad": BackendType("regad", "RegADBackend", "RegADConfig", paper="RegAD (Huang et al., ECCV 2022)", images=True,
                         trainer="regad.train", train_scope="others", shots=True, refinable=False),
}

#: backend types with a trainer (``anorefiner train-backend``)
TRAINED_TYPES = tuple(k for k, v in BACKEND_TYPES.items() if v.trainer)
#: backend types PGT can refine
REFINABLE_TYPES = tuple(k for k, v in BACKEND_TYPES.items() if v.refinable)
#: backend types rule ``tta`` can adapt
TTA_TYPES = tuple(k for k, v in BACKEND_TYPES.items() if v.tta)


# Which backends' maps depend on the run's seed, given their options (the workflow computes the others' maps
# once and lets every seed read them). From what each module does with ``seed``: MuSc's groups are a seeded
# permutation (``group_order: shuffled``) only when it scores in groups; WinCLIP draws its k-shot references
# with it; APRIL-GAN, VCP-CLIP, AnomalyCLIP and AA-CLIP score each image with fixed weights (the seed only sets
# their training, rule train_backend); PA-CLIP (coreset, CADA views), +PAD+PAM, RareCLIP (stream order), AdaCLIP
# (KMeans), Bayes-PFL (Monte-Carlo flow samples) and everything else are treated as seed-dependent. The few-shot
# methods draw their shots with it; PromptAD with 0 shots has none (its prompts start from a fixed seed).
_SEED_FREE = {
    "musc": lambda o: o.get("group_size") is None or o.get("group_order", "shuffled") != "shuffled",
    "winclip": lambda o: int(o.get("k_shot", 0) or 0) == 0,
    "april_gan": lambda o: True,
    "vcp_clip": lambda o: True,
    "anomalyclip": lambda o: True,
    "aa_clip": lambda o: True,
    "promptad": lambda o: int(o.get("k_shot", 4) or 0) == 0,
}


def seed_dependent(kind: str, options: dict) -> bool:
    """Whether a backend of type ``kind`` with ``options`` (``backends.<name>.options``) can give different maps
    for different seeds (unknown types: yes)."""
    free = _SEED_FREE.get(kind)
    return free is None or not free(options or {})


def backend_type(kind: str) -> BackendType:
    try:
        return BACKEND_TYPES[kind]
    except KeyError:
        raise ValueError(f"unknown backend type {kind!r}; known: {', '.join(BACKEND_TYPES)}") from None
