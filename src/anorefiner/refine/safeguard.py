"""The refiner's safeguard: an ARD refines a group only if it beats the coarse map on data it did not train on.

Not in the paper (issue 26). The paper averages every group's coarse map with the ARD trained on the
previous groups. On categories where the pseudo-anomalies teach the ARD the wrong cue (MVTec AD transistor: it
fired at full confidence on normal leads, holes and case edges), that average is worse than the coarse map
alone. Before an ARD refines a group, :func:`check` scores two things no label was read for:

* **held-back pseudo-anomalies**: ``PGTConfig.safeguard_holdout`` extra pseudo-anomalies per pseudo-normal
  image of the ARD's training group, synthesised in their own seeded stream and never trained on (so the
  training set is identical with the safeguard on or off);
* **the pseudo-normal images of the group about to be refined**: its r images with the lowest coarse maximum
  (PGT's own selection, Sec. 3.2), taken as wholly normal (empty masks): where the ARD fires on them, it
  fires on normal structure of this very group.

Pixel AP pooled over both, of the combined map (``PGTConfig.combine``, with the ARD calibrated by the map
``PGTConfig.calibration`` fitted on the group's real images, the one its combined maps get) against the coarse
map ``coarse_n`` alone. Only if combined beats coarse by more than ``safeguard_margin`` does the ARD refine the group;
otherwise the group keeps its coarse map, on the scale of refined groups' combined maps (that of an ARD saying
nothing, calibrated like theirs: ``0.5·coarse_n`` without calibration; what ``first_group_ard: zeros`` gives
group 1: per image the coarse ranking, and pooled with refined groups no scale jump). The ARD's own map is still
stored under ``ard`` (Table 9 measures the ARD alone).
"""

from __future__ import annotations

import numpy as np
import torch

from ..metrics.pixel import pixel_metrics
from .combine import combine


def check(trainer, holdout: dict, normals: np.ndarray, norm, calibrated=None) -> dict:
    """Pixel AP of combined vs coarse on ``holdout`` (pseudo-anomalies) and the images ``normals`` (empty masks).

    ``calibrated`` maps ARD values onto the coarse scale, :func:`~anorefiner.refine.combine.calibration_map` fitted
    on the group's real images (``None``: the ARD as it is). Fitting it on the check set instead would let the
    pseudo-anomalies, which the coarse map already finds, decide how far the ARD counts.

    ``trainer`` is PGT's :class:`~anorefiner.refine.trainer.Trainer` holding the ARD to check; maps are compared at the backbone's input
    resolution (where the pseudo-anomaly masks live). Returns the two pooled APs, the APs on the held-back
    pseudo-anomalies alone, and the share of the pseudo-normals' pixels where the ARD says > 0.5 (they have no
    positive pixel, so no AP of their own).
    """
    res = trainer.resolution
    x_n, c_n = trainer.real_inputs(normals, norm)
    c_h = torch.as_tensor(norm(holdout["coarse"]))[:, None].float()
    ard = np.concatenate([trainer.refine(holdout["x"], c_h, res), trainer.refine(x_n, c_n, res)])
    coarse = trainer.coarse_at(np.concatenate([holdout["coarse"], trainer.coarse.maps[normals]]), res, norm)
    masks = np.concatenate([holdout["masks"][:, 0].numpy() > 0.5, np.zeros((len(normals), res, res), bool)])
    combined = combine(coarse, ard if calibrated is None else calibrated(ard), trainer.options.pgt.combine)
    n_h = len(holdout["x"])
    ap_combined = pixel_metrics(combined, masks)["ap"]
    ap_coarse = pixel_metrics(coarse, masks)["ap"]
    return {"ap_combined": float(ap_combined), "ap_coarse": float(ap_coarse),
            "holdout_ap_combined": float(pixel_metrics(combined[:n_h], masks[:n_h])["ap"]),
            "holdout_ap_coarse": float(pixel_metrics(coarse[:n_h], masks[:n_h])["ap"]),
            "normals_ard_above_0.5": float((ard[n_h:] > 0.5).mean()),
            "n_holdout": int(n_h), "n_normals": int(len(normals))}
