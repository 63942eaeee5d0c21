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

Both rules give ``A_n / 2`` where the ARD says 0 (``A_n >= 0``), so without calibration a group kept coarse (the
safeguard, ``first_group_ard: zeros``, both ``combine(A_n, 0)``) sits on the scale of refined groups under either
rule; with calibration such a group gets ``combine(A_n, calibrate(A_n, 0))`` (a calibrated ARD is never 0). Both
rules are monotone non-decreasing in each argument.

Calibration before the combination (``PGTConfig.calibration``, issue 26; not in the paper): the ARD's sigmoid
output (Dice-trained, so pushed to 0/1) is mapped onto the coarse map's scale, per group, from the group's own
real images and no label:

* ``"quantile"``: the ARD's quantiles onto the coarse map's (the ARD's ranking, the coarse map's distribution);
* ``"isotonic"``: the isotonic regression of the coarse map on the ARD map, ``E[A_n | Ā]`` (the ARD's ranking,
  as confident as the coarse map agrees with it: an ARD the coarse map does not follow becomes flat).
"""

from __future__ import annotations

import numpy as np

COMBINE_RULES = ("mean", "gate")
CALIBRATIONS = ("none", "quantile", "isotonic")


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


def calibrate(coarse_n: np.ndarray, ard: np.ndarray, mode: str = "none") -> np.ndarray:
    """The ARD maps of one group mapped onto the scale of its normalised coarse maps, within [0, 1] (module doc);
    ``"none"`` returns ``ard`` unchanged. Both are monotone in ``ard``, so the ARD's own ranking (its metrics) is
    kept."""
    if mode == "none":
        return ard
    return calibration_map(coarse_n, ard, mode)(ard)


def calibration_map(coarse_n: np.ndarray, ard: np.ndarray, mode: str = "none"):
    """The map :func:`calibrate` fits on one group's ``coarse_n`` and ``ard``, as a function of ARD maps: applied to
    ``ard`` it is ``calibrate``; the stream mode (:mod:`anorefiner.stream`) applies it to the next images."""
    if mode == "none":
        return lambda x: x
    a, c = np.asarray(ard, np.float64).ravel(), np.asarray(coarse_n, np.float64).ravel()
    if mode == "quantile":
        q = np.linspace(0.0, 1.0, 1001)
        knots, inverse = np.unique(np.quantile(a, q), return_inverse=True)
        # tied ARD values (a saturated sigmoid, a constant map) span several knots; np.interp would give them the
        # top one's coarse quantile (a constant ARD: the coarse maximum); they take the mean of those knots' instead
        counts = np.bincount(inverse)
        values = np.bincount(inverse, np.quantile(c, q)) / counts

        def fitted(x):
            return np.interp(x, knots, values)
    elif mode == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        fitted = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(a, c).predict
    else:
        raise ValueError(f"pgt.calibration={mode!r}: expected one of {CALIBRATIONS}")

    def apply(x):
        # onto [0, 1], the ARD's own range: under the frozen first-group scale coarse_n leaves it (transistor: up to
        # 1.25), and a calibrated value above 1 would let the gate raise a pixel above its coarse score, below 0
        # lower it by more than half
        out = fitted(np.asarray(x, np.float64).ravel())
        return out.clip(0.0, 1.0).reshape(np.shape(x)).astype(np.float32)

    return apply
