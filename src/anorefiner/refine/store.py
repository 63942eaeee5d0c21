"""Refined store: one HDF5 per (dataset, backend, variant, seed, category), docs/architecture.md "Stores".

Layout: ``ids`` (utf-8 strings, index order); ``maps/<method>`` [N,E,E] float16 at the evaluation
resolution; ``scores/<method>`` [N] float32; ``groups`` [N] int (PGT group of each image, 0-based);
file attributes hold JSON-encoded values (options, seed, timings, ...). Optional ``diagnostics/group<k>/``:
one pseudo-anomaly of group k's training set with its ``image`` (uint8), ``mask``, ``coarse``, ``ard`` and
``combined`` maps at the backbone's input resolution (``benchmarks/refine_gain.py`` draws them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..io import atomic_path

METHODS = ("coarse", "ard", "combined")


@dataclass
class Refined:
    """Per-image maps and image scores of each method (``coarse``, ``ard``, ``combined``)."""

    ids: list[str]
    maps: dict[str, np.ndarray]  # method -> [N, E, E]
    scores: dict[str, np.ndarray]  # method -> [N]
    groups: np.ndarray  # [N] PGT group index
    attrs: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)  # "group<k>" -> {"image", "mask", "coarse", "ard", "combined"}


def write_refined(path: str | Path, refined: Refined) -> Path:
    """Write ``refined`` atomically (temp file + rename); checks every array has N rows."""
    n = len(refined.ids)
    if set(refined.maps) != set(refined.scores):
        raise ValueError(f"write_refined {path}: maps methods {sorted(refined.maps)} != scores methods "
                         f"{sorted(refined.scores)}")
    for method, arr in list(refined.maps.items()) + list(refined.scores.items()):
        if len(arr) != n:
            raise ValueError(f"write_refined {path}: method {method!r} has {len(arr)} rows, expected {n} ids")
    if len(refined.groups) != n:
        raise ValueError(f"write_refined {path}: groups has {len(refined.groups)} rows, expected {n}")
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("ids", data=np.asarray(refined.ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
            for method, arr in refined.maps.items():
                f.create_dataset(f"maps/{method}", data=np.asarray(arr, dtype=np.float16),
                                 compression="gzip", compression_opts=4, chunks=(1,) + tuple(np.shape(arr)[1:]))
                f.create_dataset(f"scores/{method}", data=np.asarray(refined.scores[method], dtype=np.float32))
            f.create_dataset("groups", data=np.asarray(refined.groups, dtype=np.int64))
            for key, value in refined.attrs.items():
                f.attrs[key] = json.dumps(value, default=str)
            for group, arrays in refined.diagnostics.items():
                for name, arr in arrays.items():
                    f.create_dataset(f"diagnostics/{group}/{name}", data=np.asarray(arr), compression="gzip")
    return Path(path)


def read_refined(path: str | Path, methods: tuple[str, ...] | None = None) -> Refined:
    """Read a refined store (all methods, or only ``methods``); maps come back as float32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"refined store {path} does not exist")
    with h5py.File(path, "r") as f:
        for key in ("ids", "maps", "scores", "groups"):
            if key not in f:
                raise ValueError(f"refined store {path} has no '{key}' (keys: {sorted(f.keys())})")
        ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["ids"][()]]
        available = sorted(f["maps"].keys())
        wanted = list(methods) if methods is not None else available
        missing = [m for m in wanted if m not in available]
        if missing:
            raise ValueError(f"refined store {path} has no methods {missing} (has {available})")
        maps = {m: f[f"maps/{m}"][()].astype(np.float32) for m in wanted}
        scores = {m: f[f"scores/{m}"][()].astype(np.float32) for m in wanted}
        groups = f["groups"][()]
        attrs = {k: _decode(v) for k, v in f.attrs.items()}
        diagnostics = {g: {k: v[()] for k, v in f[f"diagnostics/{g}"].items()} for g in f.get("diagnostics", {})}
    return Refined(ids=ids, maps=maps, scores=scores, groups=groups, attrs=attrs, diagnostics=diagnostics)


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
