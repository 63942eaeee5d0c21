"""Shared exact core of AUROC, AP and F1-max: one sort of the normal scores.

The three threshold metrics only need, for every *anomalous* score ``a``, how many normal
scores lie strictly below ``a`` and how many lie at or below ``a``. We sort a copy of all scores
once (float16 widened to float32, so ties stay ties) and the anomalous scores once, read the
counts with ``searchsorted`` and subtract the anomalous ones; every metric is then a vectorised
sum over the anomalous scores with int64 counts and float64 accumulators. This is exact, ties
included:

- AUROC (Mann-Whitney form of the trapezoidal ROC area):
  ``sum_a (#{n < a} + #{n <= a}) / 2 / (N_pos * N_neg)``.
- AP (scikit-learn's step sum ``sum_k (R_k - R_{k-1}) P_k``): recall only moves at anomalous
  scores and every anomalous pixel of a tie group adds ``1/N_pos`` with the same precision, so
  ``AP = mean_a TP(>= a) / (TP(>= a) + FP(>= a))``.
- F1-max over the precision-recall curve, ignoring undefined points (P + R = 0): for a fixed TP
  the best threshold has the fewest FP, which is an anomalous score, so
  ``F1max = max_a 2 TP(>= a) / (TP(>= a) + FP(>= a) + N_pos)``.

The same ranks feed the MVTec AU-PRO (``pro.py``). Inputs may be NumPy arrays or torch tensors;
with tensors the sort and searches run on the tensor's device (``_rank_torch``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from anorefiner.log import LOG

UNDEFINED = float("nan")
_TORCH_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def to_numpy(x: Any, name: str) -> np.ndarray:
    """NumPy view (no copy when possible) of an array-like or tensor; torch tensors move to CPU."""
    if is_torch(x):
        x = x.detach()
        if x.dtype.is_floating_point and x.dtype not in _TORCH_NUMPY_FLOATS:
            x = x.float()  # bfloat16 has no NumPy dtype; float32 holds it exactly
        x = x.cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"{name}: expected a numeric array, got dtype object")
    return arr


def sort_dtype(dtype) -> np.dtype:
    """Dtype the scores are sorted in: float16 is widened to float32 (exact, ties stay ties).

    NumPy 2.4's default (SIMD) sort of float16 returned unsorted output here (AMD EPYC, mixed
    signs; found by the tie tests) and its stable float16 sort is ~4x slower than a float32 sort.
    """
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def score_dtype(arr: np.ndarray) -> np.ndarray:
    """Keep floating dtypes (float16 ties must stay ties); integers/bools become float64."""
    if arr.dtype.kind == "f":
        return arr
    if arr.dtype.kind in "biu":
        return arr.astype(np.float64)
    raise ValueError(f"scores must be numeric, got dtype {arr.dtype}")


@dataclass
class Ranked:
    """Anomalous scores sorted ascending with their ranks among the normal scores.

    ``neg_lt[i]`` / ``neg_le[i]``: number of normal scores ``<`` / ``<=`` ``pos[i]``.
    ``order``: permutation that sorted the anomalous scores (to carry per-pixel weights along).
    ``sorted_all``: all scores sorted (NumPy array or torch tensor), kept for threshold counts
    (MuSc PRO) when asked for, else None.
    """

    pos: np.ndarray
    order: np.ndarray
    neg_lt: np.ndarray
    neg_le: np.ndarray
    n_neg: int
    sorted_all: Any = None

    @property
    def n_pos(self) -> int:
        return int(self.pos.shape[0])

    def group_start(self) -> np.ndarray:
        """Index of the first element of each element's tie group in ``pos`` (int64)."""
        return _group_bounds(self.pos)[0]

    def count_neg_greater(self, thresholds: np.ndarray) -> np.ndarray:
        """Number of normal scores ``> t`` for each float64 threshold ``t`` (exact comparison)."""
        if self.sorted_all is None:
            raise RuntimeError("sorted scores were not kept; rank(..., keep_sorted=True)")
        pos_le = np.searchsorted(self.pos, floor_to_dtype(thresholds, self.pos.dtype), side="right")
        if is_torch(self.sorted_all):
            t = torch.from_numpy(floor_to_dtype(thresholds, _np_dtype(self.sorted_all)))
            le = torch.searchsorted(self.sorted_all, t.to(self.sorted_all.device), right=True).cpu().numpy()
        else:
            le = np.searchsorted(self.sorted_all, floor_to_dtype(thresholds, self.sorted_all.dtype), side="right")
        return self.n_neg - (le.astype(np.int64) - pos_le.astype(np.int64))


def _group_bounds(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per element of a sorted array: start and end (exclusive) index of its tie group."""
    n = sorted_values.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=new[1:])
    idx = np.arange(n, dtype=np.int64)
    start = np.maximum.accumulate(np.where(new, idx, 0))
    last = np.empty(n, dtype=bool)  # last element of its group
    last[:-1] = new[1:]
    last[-1] = True
    end = np.minimum.accumulate(np.where(last, idx + 1, n)[::-1])[::-1]
    return start, end


def _np_dtype(tensor) -> np.dtype:
    return torch.empty(0, dtype=tensor.dtype).numpy().dtype


def floor_to_dtype(values: np.ndarray, dtype) -> np.ndarray:
    """Largest ``dtype`` value <= each float64 value.

    For ``x`` of that dtype, ``x > t`` holds exactly when ``x > floor_to_dtype(t)``, so threshold
    counts can be read from a sorted array of the input dtype without a float64 copy of it.
    """
    values = np.asarray(values, dtype=np.float64)
    cast = values.astype(dtype)
    over = cast.astype(np.float64) > values
    cast[over] = np.nextafter(cast[over], np.array(-np.inf, dtype=dtype))
    return cast


def rank(scores: Any, pos: Any, keep_sorted: bool = False) -> Ranked:
    """Rank the anomalous scores ``pos`` among the normal ones, with one sort of ``scores``.

    ``scores`` holds *all* scores (normal and anomalous) and ``pos`` the anomalous subset: the
    normal counts are "all" counts minus anomalous counts, so the normal scores are never
    gathered (a masked copy of ~all pixels costs more than the sort's own copy). Tensors are
    sorted with ``torch.sort`` on their device. ``keep_sorted`` keeps the sorted scores for
    threshold counts (MuSc PRO).
    """
    if is_torch(scores) or is_torch(pos):
        return _rank_torch(scores, pos, keep_sorted)
    scores = score_dtype(np.asarray(scores))
    pos = score_dtype(np.asarray(pos).reshape(-1))
    common = sort_dtype(np.promote_types(scores.dtype, pos.dtype))
    flat = np.array(scores, dtype=common, copy=True).reshape(-1)  # fresh copy: sorted in place
    flat.sort()
    order = np.argsort(pos, kind="stable")
    pos_sorted = pos.astype(common, copy=False)[order]
    lt = np.searchsorted(flat, pos_sorted, side="left").astype(np.int64, copy=False)
    le = np.searchsorted(flat, pos_sorted, side="right").astype(np.int64, copy=False)
    return _ranked(pos_sorted, order, lt, le, flat.shape[0], flat if keep_sorted else None)


def _ranked(pos_sorted, order, all_lt, all_le, n_all: int, sorted_all) -> Ranked:
    start, end = _group_bounds(pos_sorted)
    n_pos = pos_sorted.shape[0]
    if n_all < n_pos:
        raise ValueError(f"{n_pos} anomalous scores but only {n_all} scores in all")
    # anomalous scores < pos[i] are the pos[:start]; <= pos[i] are the pos[:end]
    return Ranked(pos_sorted, order, all_lt - start, all_le - end, n_all - n_pos, sorted_all)


def _rank_torch(scores, pos, keep_sorted: bool) -> Ranked:
    scores = torch.as_tensor(scores).reshape(-1)
    pos = torch.as_tensor(pos).reshape(-1).to(scores.device)
    common = torch.promote_types(scores.dtype, pos.dtype)
    if not common.is_floating_point:
        common = torch.float64
    elif common not in _TORCH_NUMPY_FLOATS:
        common = torch.float32  # bfloat16: exact in float32
    sorted_all = torch.sort(scores.to(common)).values
    pos_sorted, order = torch.sort(pos.to(common), stable=True)
    lt = torch.searchsorted(sorted_all, pos_sorted, right=False)
    le = torch.searchsorted(sorted_all, pos_sorted, right=True)
    return _ranked(
        pos_sorted.cpu().numpy(),
        order.cpu().numpy(),
        lt.cpu().numpy().astype(np.int64, copy=False),
        le.cpu().numpy().astype(np.int64, copy=False),
        int(sorted_all.shape[0]),
        sorted_all if keep_sorted else None,
    )


def binary_metrics(r: Ranked, what: str = "scores") -> dict[str, float]:
    """AUROC, AP and F1-max from ranked scores (see module docstring for the formulas).

    With no anomalous or no normal score the three values are NaN and a warning is logged:
    AUROC/AP are undefined there, and reporting 0 would silently bias category means.
    """
    n_pos, n_neg = r.n_pos, r.n_neg
    if n_pos == 0 or n_neg == 0:
        LOG.warning(
            "%s: %d anomalous and %d normal values; AUROC/AP/F1-max are undefined, reporting NaN",
            what, n_pos, n_neg,
        )
        return {"auroc": UNDEFINED, "ap": UNDEFINED, "f1_max": UNDEFINED}
    # int64 sums are exact (< 2**63 for any realistic size); divide once in float64.
    u2 = int(r.neg_lt.sum(dtype=np.int64)) + int(r.neg_le.sum(dtype=np.int64))
    auroc = u2 / (2.0 * n_pos * n_neg)
    tp = (n_pos - r.group_start()).astype(np.float64)
    fp = (n_neg - r.neg_lt).astype(np.float64)
    ap = float(np.mean(tp / (tp + fp)))
    f1_max = float(np.max(2.0 * tp / (tp + fp + n_pos)))
    return {"auroc": float(auroc), "ap": ap, "f1_max": f1_max}


def check_finite(values: np.ndarray, what: str, chunk: int = 16) -> None:
    """Raise ``ValueError`` naming the first image (index along axis 0) with NaN/inf scores."""
    if values.ndim == 1:
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise ValueError(f"{what}: non-finite score {values[bad[0]]} at index {int(bad[0])}")
        return
    for start in range(0, values.shape[0], chunk):
        block = values[start : start + chunk]
        ok = np.isfinite(block).reshape(block.shape[0], -1).all(axis=1)
        if not ok.all():
            i = start + int(np.flatnonzero(~ok)[0])
            raise ValueError(f"{what}: image index {i} contains NaN or infinite scores")


def check_finite_torch(values, what: str) -> None:
    ok = torch.isfinite(values).reshape(values.shape[0], -1).all(dim=1)
    if not bool(ok.all()):
        i = int(torch.nonzero(~ok)[0, 0])
        raise ValueError(f"{what}: image index {i} contains NaN or infinite scores")
