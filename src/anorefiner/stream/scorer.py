"""Online coarse maps: each image scored once, on arrival, from itself and the images before it.

Two kinds of backends score online (:func:`online_scorer` refuses the others, naming them and why):

* :class:`ImageScorer`: backends whose map of an image does not depend on the other test images: APRIL-GAN,
  VCP-CLIP, Bayes-PFL and AA-CLIP with ``class_minmax: false`` (their official min-max runs over the whole class
  stack), WinCLIP (zero-shot), AnomalyCLIP, AdaCLIP. The backend's own ``coarse`` runs on a one-image feature set
  (Bayes-PFL draws each image's flow samples by its position in the scored set: here always position 0).
* :class:`MuscWindowScorer`: MuSc scores an image against other images of the category (mutual scoring). Online
  its references are the ``window`` images before it (:class:`~anorefiner.stream.config.StreamConfig`); the
  first ``min_references + 1`` images wait until that many have arrived and are then scored against each
  other, as MuSc scores a set (each against the rest). Image score: the map's maximum (MuSc's RsCIN re-scores
  an image against the scores of its whole set; it is not applied online).

Both are also the ``backend`` PGT's :class:`~anorefiner.refine.trainer.Trainer` uses for the pseudo-anomalies
(:meth:`score_queries`, :meth:`reference_indices`), over the stream's :class:`~anorefiner.stream.rows.StreamFeatures`
or any dense :class:`~anorefiner.cache.Features` (the offline run of the equivalence test).
"""

from __future__ import annotations

import numpy as np
import torch

from ..zsad import PRESETS
from ..zsad.registry import backend_type

# Backend types that score an image online (module doc); every other type is refused.
ONLINE = ("musc", "april_gan", "vcp_clip", "bayes_pfl", "aa_clip", "winclip", "anomalyclip", "adaclip")
# Why the others cannot (``online_scorer`` raises with this text).
NOT_ONLINE = {
    "paclip": "PA-CLIP builds its memory (coreset) from the whole test set of the category",
    "byo": "bring-your-own maps are read from a file made offline",
    "pad_pam": "PA-CLIP's PAD/PAM compare each image with the rest of the test set",
    "rareclip": "RareCLIP's rarity memory over the stream is not checkpointed by the stream mode yet, so a "
                "restart could not resume it (not implemented)",
    "promptad": "few-shot: it needs train/good shots of the category, which the stream does not take (not implemented)",
    "mvfa_ad": "few-shot: it needs train/good shots of the category, which the stream does not take (not implemented)",
    "regad": "few-shot: it is trained per category and needs its shots, which the stream does not take "
             "(not implemented)",
}


def online_scorer(backend_name: str, backend, *, window: int, min_references: int):
    """The online scorer of ``backend`` (built by :func:`anorefiner.zsad.get_backend` from ``backend_name``).

    Raises ``ValueError`` naming the backend when it cannot score online.
    """
    kind = PRESETS[backend_name][0] if backend_name in PRESETS else backend_name
    if kind not in ONLINE:
        why = NOT_ONLINE.get(kind, "it was not checked for scoring one image at a time")
        raise ValueError(f"backend {backend_name!r} cannot score a stream: {why}. Online backends: "
                         f"{', '.join(ONLINE)}")
    if kind == "musc":
        return MuscWindowScorer(backend, window=window, min_references=min_references)
    config = getattr(backend, "config", None)
    if getattr(config, "class_minmax", False):
        raise ValueError(f"backend {backend_name!r} ({kind}) with option class_minmax: true min-max normalises over "
                         "the whole class stack, which a stream never has; set class_minmax: false")
    if kind == "winclip" and int(getattr(config, "k_shot", 0) or 0) > 0:
        raise ValueError(f"backend {backend_name!r} (winclip) with k_shot > 0 needs train/good reference images; "
                         "the stream runs the zero-shot mode only (k_shot: 0)")
    return ImageScorer(backend, images=backend_type(kind).images, refinable=backend_type(kind).refinable)


class _Scorer:
    """What both scorers share: the backend, and ``score_queries`` over the stream's rows."""

    lookback = 0  # how many images before an image its coarse map reads
    refinable = True

    def __init__(self, backend):
        self.backend = backend
        self.name = backend.name

    def ready(self, n_accepted: int, n_scored: int, final: bool = False) -> list[int]:
        """Indices that can be scored now that ``n_accepted`` images arrived and ``n_scored`` were scored
        (``final``: the input ended, score whatever waits)."""
        return list(range(n_scored, n_accepted))

    def references(self, index: int, n_accepted: int | None = None) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)

    def oldest_needed(self, index: int) -> int:
        """The oldest image whose features scoring ``index`` (or training its group) reads."""
        refs = self.references(index)
        return int(min(index, refs.min())) if len(refs) else int(index)

    def reference_indices(self, n: int, sources) -> np.ndarray:
        """References of the pseudo-anomalies made from ``sources`` (``PGTConfig.query_references: backend``):
        the images the sources were scored against, and the sources themselves (each excluded from its own)."""
        parts = [np.asarray(sources, dtype=np.int64)] + [self.references(int(s)) for s in sources]
        return np.unique(np.concatenate(parts))

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude):
        """The backend's ``score_queries`` on a dense copy of the reference rows (positions remapped)."""
        refs = np.asarray(reference_idx, dtype=np.int64)
        pos = {int(j): p for p, j in enumerate(refs)}
        sub = feats.subset(refs) if hasattr(feats, "subset") else _dense_subset(feats, refs)
        excl = [None if e is None or int(e) not in pos else pos[int(e)] for e in exclude]
        return self.backend.score_queries(query_layers, query_cls, sub, list(range(len(refs))), excl)


def _dense_subset(feats, idx):
    from ..cache import Features

    return Features(ids=[feats.ids[int(i)] for i in idx],
                    layers={k: np.asarray(v[idx]) for k, v in feats.layers.items()},
                    cls=None if feats.cls is None else np.asarray(feats.cls[idx]), attrs=dict(feats.attrs))


class ImageScorer(_Scorer):
    """A backend that maps each image on its own (module doc)."""

    def __init__(self, backend, *, images: bool, refinable: bool):
        super().__init__(backend)
        self.images, self.refinable = images, refinable

    def score(self, feats, index: int, image: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """Patch-level map ``[h, w]`` and image score of image ``index``."""
        one = feats.subset([index])
        if self.images:
            if image is None:
                raise ValueError(f"backend {self.name!r} scores images: the image itself is needed")
            self.backend.images = lambda idx: [image for _ in idx]
        res = self.backend.coarse(one)
        return np.asarray(res.maps[0], dtype=np.float32), float(res.scores[0])


class MuscWindowScorer(_Scorer):
    """MuSc against a bounded window of the images before each one (module doc)."""

    def __init__(self, backend, *, window: int, min_references: int):
        super().__init__(backend)
        if int(window) < 1 or int(min_references) < 1:
            raise ValueError(f"stream: musc window={window} and min_references={min_references} must be >= 1")
        if int(min_references) > int(window):
            raise ValueError(f"stream: musc min_references={min_references} exceeds window={window}")
        self.window, self.min_references = int(window), int(min_references)
        self.lookback = self.window

    def ready(self, n_accepted: int, n_scored: int, final: bool = False) -> list[int]:
        first = self.min_references + 1  # images scored together at the start
        if n_accepted < first and not (final and n_accepted >= 2):
            return []
        return list(range(n_scored, n_accepted))

    def references(self, index: int, n_accepted: int | None = None) -> np.ndarray:
        """The images ``index`` is scored against: the ``window`` before it; for the first ``min_references + 1``
        images the others of that set (fewer when the input ends before, ``n_accepted``)."""
        first = self.min_references + 1
        if index < first:
            n = first if n_accepted is None else min(first, n_accepted)
            return np.asarray([j for j in range(n) if j != index], dtype=np.int64)
        return np.arange(max(0, index - self.window), index, dtype=np.int64)

    def score(self, feats, index: int, image=None, n_accepted: int | None = None) -> tuple[np.ndarray, float]:
        from ..zsad.musc.backend import score_queries

        c = self.backend.config
        refs = self.references(index, n_accepted)
        names = list(c.layers) if c.layers else list(feats.layers)
        query = {k: torch.as_tensor(feats.layers[k][[index]]) for k in names}
        ref = {k: torch.as_tensor(feats.layers[k][refs]) for k in names}
        patch = score_queries(query, ref, None, c.r_list, c.topmin, l2_normalize=c.l2_normalize, chunk=c.chunk,
                              device=self.backend.device)[0].cpu().numpy().astype(np.float32)
        return patch, float(patch.max())
