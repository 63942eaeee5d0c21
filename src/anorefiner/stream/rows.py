"""The stream's memory of recent images: per-image rows (features, coarse maps) addressed by arrival index.

A stream never ends, so it cannot hold a :class:`~anorefiner.cache.Features` of every image. :class:`Rows` keeps
the rows of the indices that are still needed (the MuSc window, the groups whose ARD is not trained yet) and
answers the indexing PGT's :class:`~anorefiner.refine.trainer.Trainer` and the backends do on cached arrays
(``rows[idx]`` with an index array, ``rows[:1]``, ``rows.shape``), so they run unchanged on it. Asking for a row
that was dropped (:meth:`Rows.drop_before`) or never added is an error naming the index.

Thread safety: the scorer adds rows while the ARD's training thread reads them. A row is complete before it
is published (one dict assignment, atomic under the GIL) and a reader only asks for rows of finished images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class Rows:
    """Rows ``[...]`` of one array, keyed by arrival index; indexable like an ``[n, ...]`` ndarray."""

    def __init__(self, name: str):
        self.name = name
        self._rows: dict[int, np.ndarray] = {}
        self._n = 0  # one past the highest index ever added: len() and shape[0] as for the full array

    def add(self, index: int, row) -> None:
        self._rows[int(index)] = np.asarray(row)
        self._n = max(self._n, int(index) + 1)

    def drop_before(self, index: int) -> None:
        """Forget every row below ``index`` (no longer needed by the scorer or the training)."""
        for i in [i for i in self._rows if i < index]:
            del self._rows[i]

    def kept(self) -> list[int]:
        return sorted(self._rows)

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> tuple:
        first = self._rows[min(self._rows)] if self._rows else np.zeros(0)
        return (self._n,) + tuple(first.shape)

    @property
    def dtype(self):
        return next(iter(self._rows.values())).dtype

    def _row(self, i: int) -> np.ndarray:
        try:
            return self._rows[int(i)]
        except KeyError:
            raise IndexError(f"stream {self.name}: image {int(i)} is not held (held: {self._span()})") from None

    def _span(self) -> str:
        kept = self.kept()
        return f"{kept[0]}..{kept[-1]}" if kept else "none"

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return self._row(idx)
        if isinstance(idx, slice):
            start = min(self._rows) if idx.start is None and self._rows else idx.start
            idx = range(*slice(start, idx.stop, idx.step).indices(self._n))
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) == 0:
            return np.zeros((0,) + self.shape[1:], dtype=self.dtype)
        return np.stack([self._row(i) for i in idx])

    def __array__(self, dtype=None, copy=None):
        raise TypeError(f"stream {self.name}: index it (rows[idx]); it does not hold every image")


@dataclass
class StreamFeatures:
    """A :class:`~anorefiner.cache.Features` look-alike over :class:`Rows` (``ids``, ``layers``, ``cls``)."""

    layer_names: list[str]
    has_cls: bool
    ids: list[str] = field(default_factory=list)  # name of every image 0..n-1 (small: kept for all)
    layers: dict[str, Rows] = field(init=False)
    cls: Rows | None = field(init=False)
    attrs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.layers = {k: Rows(f"features[{k}]") for k in self.layer_names}
        self.cls = Rows("cls") if self.has_cls else None

    def add(self, index: int, name: str, layers: dict, cls) -> None:
        if index != len(self.ids):
            raise ValueError(f"stream features: image {index} added after {len(self.ids)} images")
        for k in self.layer_names:
            self.layers[k].add(index, layers[k])
        if self.cls is not None:
            self.cls.add(index, cls)
        self.ids.append(str(name))

    def drop_before(self, index: int) -> None:
        for rows in self.layers.values():
            rows.drop_before(index)
        if self.cls is not None:
            self.cls.drop_before(index)

    def subset(self, indices):
        """A dense :class:`~anorefiner.cache.Features` of ``indices`` (in that order)."""
        from ..cache import Features

        idx = np.asarray(indices, dtype=np.int64)
        return Features(ids=[self.ids[int(i)] for i in idx], layers={k: v[idx] for k, v in self.layers.items()},
                        cls=None if self.cls is None else self.cls[idx], attrs=dict(self.attrs))


@dataclass
class StreamCoarse:
    """A :class:`~anorefiner.zsad.store.Coarse` look-alike: patch-level coarse maps and scores as :class:`Rows`."""

    maps: Rows = field(default_factory=lambda: Rows("coarse maps"))
    scores: Rows = field(default_factory=lambda: Rows("coarse scores"))

    def add(self, index: int, patch_map, score: float) -> None:
        self.maps.add(index, np.asarray(patch_map, dtype=np.float32))
        self.scores.add(index, np.float32(score))

    def drop_before(self, index: int) -> None:
        self.maps.drop_before(index)
        self.scores.drop_before(index)
