"""Product groups shared by MuSc* (paper Table 1, "*") and PGT (paper Sec. 3.2).

AnoRefiner partitions the test images of a category "uniformly" into groups of ``u`` images
(u = 30; toothbrush's 42 images give 2 x 21). ``n_groups = ceil(N / u)`` and
``numpy.array_split`` reproduce exactly that: group sizes differ by at most one and none
exceeds ``u``.

Small categories (N <= u, which no category of the paper has): one group would leave PGT with
nothing to refine — group 1 keeps its coarse map and the ARD trained on it is never applied — so
such a category is split in two (``min_groups = 2``), as the paper splits its smallest category
(toothbrush, 42 < 2u) into two. Both MuSc* and PGT call :func:`make_groups` with the same
arguments, so they keep scoring and refining identical groups.
"""

from __future__ import annotations

import math

import numpy as np

# Fewest groups a category of at least this many images is split into (group_size given): group 1 trains the
# ARD, group 2 is refined by it. 1 restores the plain ceil(N/u) rule.
MIN_GROUPS = 2


def n_groups(n: int, group_size: int | None, min_groups: int = MIN_GROUPS) -> int:
    """``ceil(n / group_size)``, but at least ``min(min_groups, n)``; 1 when ``group_size`` is None."""
    if group_size is None or n == 0:
        return 1 if n else 0
    return max(math.ceil(n / int(group_size)), min(int(min_groups), n))


def make_groups(n: int, group_size: int | None, seed: int | None = None,
                min_groups: int = MIN_GROUPS) -> list[np.ndarray]:
    """Split image indices ``0..n-1`` into :func:`n_groups` near-equal groups.

    ``group_size=None`` gives one group holding every image. The order is *index order*
    (see docs/architecture.md) unless ``seed`` is given, in which case the indices are
    permuted by a seeded generator first (each group is then sorted, so within-group order
    stays index order). Returns ``int64`` arrays.
    """
    if n < 0:
        raise ValueError(f"make_groups: number of images must be >= 0, got n={n}")
    if group_size is not None and int(group_size) < 1:
        raise ValueError(f"make_groups: group_size must be >= 1 or None, got {group_size!r}")
    if int(min_groups) < 1:
        raise ValueError(f"make_groups: min_groups must be >= 1, got {min_groups!r}")
    order = np.arange(n, dtype=np.int64)
    if n == 0:
        return []
    if seed is not None:
        order = np.random.default_rng(int(seed)).permutation(n).astype(np.int64)
    groups = np.array_split(order, n_groups(n, group_size, min_groups))
    if seed is not None:
        groups = [np.sort(g) for g in groups]
    return [np.asarray(g, dtype=np.int64) for g in groups]
