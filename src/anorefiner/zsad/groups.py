"""Product groups shared by MuSc* (paper Table 1, "*") and PGT (paper Sec. 3.2).

AnoRefiner partitions the test images of a category "uniformly" into groups of ``u`` images
(u = 30; toothbrush's 42 images give 2 x 21). ``n_groups = ceil(N / u)`` and
``numpy.array_split`` reproduce exactly that: group sizes differ by at most one and none
exceeds ``u``.
"""

from __future__ import annotations

import math

import numpy as np


def make_groups(n: int, group_size: int | None, seed: int | None = None) -> list[np.ndarray]:
    """Split image indices ``0..n-1`` into ``ceil(n / group_size)`` near-equal groups.

    ``group_size=None`` gives one group holding every image. The order is *index order*
    (see docs/architecture.md) unless ``seed`` is given, in which case the indices are
    permuted by a seeded generator first (each group is then sorted, so within-group order
    stays index order). Returns ``int64`` arrays.
    """
    if n < 0:
        raise ValueError(f"make_groups: number of images must be >= 0, got n={n}")
    if group_size is not None and int(group_size) < 1:
        raise ValueError(f"make_groups: group_size must be >= 1 or None, got {group_size!r}")
    order = np.arange(n, dtype=np.int64)
    if n == 0:
        return []
    if seed is not None:
        order = np.random.default_rng(int(seed)).permutation(n).astype(np.int64)
    n_groups = 1 if group_size is None else math.ceil(n / int(group_size))
    groups = np.array_split(order, n_groups)
    if seed is not None:
        groups = [np.sort(g) for g in groups]
    return [np.asarray(g, dtype=np.int64) for g in groups]
