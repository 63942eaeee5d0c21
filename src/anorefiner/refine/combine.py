"""The final segmentation map from the coarse map and the ARD's refined map (AnoRefiner Sec. 3.2, Table 9).

The paper: "to balance the trade-off between false positives in the coarse anomaly map A and potential false
negatives in the refined anomaly map Ā, we compute their average as the final segmentation result" (Sec. 3.2;
Sec. 4.4 with Table 9 says the same: the ZSAD map has false positives, the ARD false negatives).

* ``"mean"``: the paper's average, ``(A_n + Ā) / 2``.
* ``"gate"``: ``A_n · (1 + Ā) / 2`` (for ``A_n < 0``, below the frozen scale's floor, ``A_n`` itself, so the map
  stays monotone in both arguments; ``coarse_norm: first_group`` puts later groups' most normal pixels there). The same two roles, kept apart: the ARD may lower a pixel's coarse score (by
  up to half, where it says "normal") but never raise it above the coarse score. Under the mean an ARD's
  confident false positive adds up to 0.5 to any pixel, however normal the backend found it; on MVTec AD
  transistor the ARD (trained on Perlin/DTD pseudo-anomalies) fired above 0.9 on leads, holes and case edges of
  half the good images, and those pixels outranked the real defects it missed (issue 26, docs/refiner_audit.md).

Both rules give ``A_n / 2`` where the ARD says 0 (``A_n >= 0``), so a group kept coarse (the safeguard,
``first_group_ard: zeros``, both ``combine(A_n, 0)``) sits on the scale of refined groups under either rule; both
are monotone non-decreasing in each argument.
"""

from __future__ import annotations

COMBINE_RULES = ("mean", "gate")


def combine(coarse_n, ard, rule: str = "mean"):
    """Final map from the normalised coarse map ``coarse_n`` and the ARD map ``ard`` (same shape, or ``ard`` a
    scalar such as 0 for "nothing refined"), by ``rule`` (module doc). Works on numpy arrays and torch tensors."""
    if rule == "mean":
        return 0.5 * (coarse_n + ard)
    if rule == "gate":
        # coarse_n − (1 − ard)·max(coarse_n, 0)/2: equals coarse_n·(1 + ard)/2 where coarse_n >= 0
        positive = coarse_n.clip(min=0) if hasattr(coarse_n, "clip") else max(coarse_n, 0.0)
        return coarse_n - 0.5 * (1.0 - ard) * positive
    raise ValueError(f"pgt.combine={rule!r}: expected one of {COMBINE_RULES}")

