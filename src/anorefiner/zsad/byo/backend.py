"""Bring your own maps: refine anomaly maps produced by any zero-shot method.

File format (HDF5 ``.h5``/``.hdf5`` or NumPy ``.npz``; see ``docs/byo.md``):

* ``ids``    [N] strings, the image ids of the dataset index: ``"<split>/<defect>/<stem>"``,
  e.g. ``"test/broken_large/000"`` (utf-8 strings in HDF5; a str array in NPZ, no pickles);
* ``maps``   [N, H, W] float, one anomaly map per image at any resolution (higher = more anomalous);
* ``scores`` [N] float, optional image scores; when absent the max of each map is used.

The file may hold more images than the category (extra ids are ignored) and in any order;
every id of the feature cache must be present. Maps are resized to the patch grid of the feature
cache: ``area`` when shrinking (each patch gets the mean of the pixels it covers), ``bilinear``
when enlarging.

PGT also needs coarse maps of its synthesised pseudo-anomalies, which the user's method never saw.
:class:`ByoBackend` therefore scores those with a proxy (config ``byo.query_scorer``; only
``"musc"``: MuSc on the same cached features against the group's references).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...config import from_dict
from ..store import Coarse


def _read(path: Path) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            missing = [k for k in ("ids", "maps") if k not in f]
            if missing:
                raise ValueError(f"BYO maps file {path} lacks dataset(s) {missing}")
            ids = [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in f["ids"][()]]
            maps = np.asarray(f["maps"][()])
            scores = np.asarray(f["scores"][()]) if "scores" in f else None
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("ids", "maps") if k not in f.files]
            if missing:
                raise ValueError(f"BYO maps file {path} lacks array(s) {missing}")
            ids = [str(i) for i in f["ids"]]
            maps = np.asarray(f["maps"])
            scores = np.asarray(f["scores"]) if "scores" in f.files else None
    else:
        raise ValueError(f"BYO maps file {path}: unknown extension {path.suffix!r} (use .h5, .hdf5 or .npz)")
    if maps.ndim != 3 or maps.shape[0] != len(ids):
        raise ValueError(f"BYO maps file {path}: 'maps' must be [N,H,W] with N={len(ids)} ids, got {maps.shape}")
    if scores is not None and scores.reshape(-1).shape[0] != len(ids):
        raise ValueError(f"BYO maps file {path}: 'scores' has {scores.size} values for {len(ids)} ids")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"BYO maps file {path}: id {dup!r} appears more than once")
    return ids, maps, scores


def resize_maps(maps: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``[N, H, W]`` -> ``[N, h, w]`` float32: area when shrinking, bilinear when enlarging (per axis
    both shrink -> area; otherwise bilinear, align_corners=False)."""
    h, w = int(grid[0]), int(grid[1])
    x = torch.as_tensor(np.asarray(maps, dtype=np.float32))[:, None]
    if tuple(x.shape[-2:]) == (h, w):
        return x[:, 0].numpy()
    if x.shape[-2] >= h and x.shape[-1] >= w:
        y = F.interpolate(x, size=(h, w), mode="area")
    else:
        y = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return y[:, 0].numpy()


def load_byo(path, ids, grid) -> Coarse:
    """Load user maps for ``ids`` (index order) resized to ``grid`` = (h, w) of the feature cache."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BYO maps file not found: {path}")
    file_ids, maps, scores = _read(path)
    pos = {i: p for p, i in enumerate(file_ids)}
    missing = [i for i in ids if i not in pos]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"BYO maps file {path} lacks {len(missing)} image id(s): {missing[:5]}{more}")
    take = np.array([pos[i] for i in ids], dtype=np.int64)
    maps = maps[take].astype(np.float32)
    if not np.isfinite(maps).all():
        bad = ids[int(np.flatnonzero(~np.isfinite(maps).reshape(len(ids), -1).all(1))[0])]
        raise ValueError(f"BYO maps file {path}: map of {bad!r} has non-finite values")
    img_scores = (maps.reshape(len(ids), -1).max(1) if scores is None
                  else np.asarray(scores, dtype=np.float32).reshape(-1)[take])
    return Coarse(ids=list(ids), maps=resize_maps(maps, grid), scores=img_scores.astype(np.float32),
                  attrs={"byo_source": str(path), "byo_resolution": list(maps.shape[1:])})


@dataclass
class ByoConfig:
    """Options of the ``byo`` backend (config ``backends.byo.options``)."""

    maps_path: str | None = None  # set by ``anorefiner coarse --byo-maps``
    query_scorer: str = "musc"  # proxy scorer for PGT's pseudo-anomalies (the only one available)
    musc: dict = field(default_factory=dict)  # MuscConfig options of the proxy (defaults: MuSc's)


class ByoBackend:
    """Backend whose ``coarse`` reads the user's maps and whose ``score_queries`` delegates to MuSc."""

    def __init__(self, config: ByoConfig | None = None, name: str = "byo", seed: int = 0, backbone=None):
        from ..musc.backend import MuscBackend, MuscConfig

        del backbone  # the user's maps need none; the MuSc proxy scores cached features as before

        self.config = config or ByoConfig()
        self.name = name
        if self.config.query_scorer != "musc":
            raise ValueError(f"byo option query_scorer must be 'musc', got {self.config.query_scorer!r}")
        self.proxy = MuscBackend(from_dict(MuscConfig, self.config.musc, "byo.musc"), name="musc", seed=seed)

    def coarse(self, feats):
        from .. import CoarseResult

        if not self.config.maps_path:
            raise ValueError("byo backend: no maps file given (option maps_path / --byo-maps)")
        grid = next(iter(feats.layers.values())).shape[1:3]
        c = load_byo(self.config.maps_path, list(feats.ids), grid)
        return CoarseResult(maps=c.maps, scores=c.scores)

    def reference_indices(self, n: int, sources) -> np.ndarray:
        return self.proxy.reference_indices(n, sources)

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude):
        return self.proxy.score_queries(query_layers, query_cls, feats, reference_idx, exclude)
