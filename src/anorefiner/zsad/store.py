"""Coarse-map store: one HDF5 per (dataset, category, backend, seed).

Layout (``results/coarse/<dataset>/<backend>/<category>/seed<k>.h5``):

* ``ids``    [N] utf-8 strings, index order (same as the feature cache)
* ``maps``   [N, h, w] float32, patch-level coarse anomaly maps
* ``scores`` [N] float32, image-level scores
* attrs: ``backend``, ``options`` (JSON), ``seed``, ``features`` (feature cache path),
  ``features_identity`` (JSON), ``versions`` (JSON: anorefiner, numpy, torch, h5py), plus any
  other key given by the writer. Dict/list values are stored as JSON strings and read back as such
  (:func:`read_coarse` decodes the keys above).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import atomic_path

JSON_ATTRS = ("options", "features_identity", "versions")


@dataclass
class Coarse:
    """Patch-level coarse anomaly maps of one category, in index order."""

    ids: list[str]
    maps: np.ndarray  # [N, h, w] float32
    scores: np.ndarray  # [N] float32 image-level scores
    attrs: dict = field(default_factory=dict)


def package_versions() -> dict:
    import h5py
    import torch

    from .. import __version__

    return {"anorefiner": __version__, "numpy": np.__version__, "torch": torch.__version__, "h5py": h5py.__version__}


def _attr_value(key: str, value):
    if value is None:
        return "null" if key in JSON_ATTRS else ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, Path):
        return str(value)
    return value


def write_coarse(path, ids, maps, scores, attrs: dict | None = None) -> Path:
    """Write a coarse store atomically (temp sibling + rename); returns ``path``."""
    import h5py

    ids = [str(i) for i in ids]
    maps = np.asarray(maps, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if maps.ndim != 3 or maps.shape[0] != len(ids) or scores.shape[0] != len(ids):
        raise ValueError(
            f"write_coarse {path}: need maps [N,h,w] and scores [N] for N={len(ids)} ids, "
            f"got maps {maps.shape} and scores {scores.shape}"
        )
    if not (np.isfinite(maps).all() and np.isfinite(scores).all()):
        bad = int(np.flatnonzero(~np.isfinite(maps).reshape(len(ids), -1).all(1) | ~np.isfinite(scores))[0])
        raise ValueError(f"write_coarse {path}: non-finite map or score for image {ids[bad]!r}")
    attrs = dict(attrs or {})
    attrs.setdefault("versions", package_versions())
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
            f.create_dataset("maps", data=maps, compression="gzip", compression_opts=4)
            f.create_dataset("scores", data=scores)
            for key, value in attrs.items():
                f.attrs[key] = _attr_value(key, value)
    return Path(path)


def read_coarse(path, expect_ids=None) -> Coarse:
    """Read a coarse store; with ``expect_ids`` (e.g. the feature cache's ids) a mismatch raises
    ``ValueError`` naming the first differing position and id."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"coarse store not found: {path}")
    with h5py.File(path, "r") as f:
        for key in ("ids", "maps", "scores"):
            if key not in f:
                raise ValueError(f"coarse store {path} lacks dataset {key!r}")
        ids = [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in f["ids"][()]]
        maps = np.asarray(f["maps"][()], dtype=np.float32)
        scores = np.asarray(f["scores"][()], dtype=np.float32)
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    for key in JSON_ATTRS:
        if isinstance(attrs.get(key), str):
            try:
                attrs[key] = json.loads(attrs[key])
            except json.JSONDecodeError:
                pass
    if expect_ids is not None:
        check_ids(ids, list(expect_ids), path)
    return Coarse(ids=ids, maps=maps, scores=scores, attrs=attrs)


def check_ids(got: list[str], expected: list[str], where) -> None:
    """Raise ``ValueError`` naming the first position where ``got`` differs from ``expected``."""
    if got == expected:
        return
    for i, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            raise ValueError(f"{where}: image id #{i} is {a!r} but the feature cache has {b!r}")
    raise ValueError(f"{where}: {len(got)} image ids but the feature cache has {len(expected)}")
