"""Pooled metrics of ``combined`` maps rebuilt from stored PGT outputs under other combination rules.

Training is unchanged by these rules (they act after the ARD), so a stored run answers them without a rerun:

* ``stored``: the run's own ``combined``;
* ``unguarded``: every group combined with its ARD by the run's own rule (the safeguard off);
* ``mean`` / ``gate``: every group combined with its ARD by that rule (``pgt.combine``, refine/combine.py);
* ``mean+quantile``, ``gate+isotonic``, ...: the same after the ARD maps of each group are calibrated onto its
  coarse maps' scale (``pgt.calibration``);
* ``centred``: the coarse half upsampled pixel-centred (``pgt.coarse_align_corners: false``), same safeguard
  decisions (uncalibrated runs only);
* ``coarse``: the backend map (the baseline).

    python benchmarks/refine_derived.py OUT/transistor/offline/default/seed0/refined.h5 ... \
        --coarse OUT/transistor/coarse.h5 --data-root ../shared/data/mvtec_ad --category transistor
"""

from __future__ import annotations

import argparse

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stores", nargs="+")
    p.add_argument("--coarse", required=True, help="the coarse store the runs refined")
    p.add_argument("--data-root", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--dataset", default="mvtec_ad")
    args = p.parse_args(argv)
    from anorefiner import stages
    from anorefiner.config import from_dict
    from anorefiner.metrics import image_metrics, pixel_metrics
    from anorefiner.metrics.evaluate import resize_maps, resize_masks
    from anorefiner.refine.combine import CALIBRATIONS, COMBINE_RULES, combine
    from anorefiner.refine.pgt import PGTConfig, image_scores
    from anorefiner.refine.store import read_refined
    from anorefiner.zsad.store import read_coarse
    from refine_gain import normalised, rebuilt

    coarse = read_coarse(args.coarse)
    summary: dict[str, list] = {}
    print("| store | rule | pixel AP | pixel F1-max | image AUROC | groups kept coarse |")
    print("|---|---|---|---|---|---|")
    for path in args.stores:
        r = read_refined(path)
        if list(coarse.ids) != list(r.ids):
            raise SystemExit(f"{path}: its image ids differ from those of {args.coarse} (another category or order)")
        pgt = from_dict(PGTConfig, r.attrs["options"]["pgt"])
        if not pgt.coarse_align_corners or pgt.first_group_ard == "coarse":
            raise SystemExit(f"{path}: the rules below assume coarse_align_corners true and first_group_ard "
                             "self or zeros")
        e = r.maps["coarse"].shape[-1]
        masks, labels = stages.ground_truth(args.data_root, args.dataset, args.category, r.ids)
        masks = resize_masks(masks, (e, e), "nearest")  # as the metrics stage at evaluation.resolution
        kept = np.zeros(len(r.ids), bool)
        for v in r.attrs.get("safeguard", []):
            if not v["refined"]:
                kept |= np.asarray(r.groups) == v["group"] - 1
        ard = r.maps["ard"]
        centred = normalised(r, resize_maps(coarse.maps, (e, e), align_corners=False))
        rules = {"coarse": r.maps["coarse"], "stored": r.maps["combined"], "unguarded": rebuilt(r)}
        if r.attrs["options"]["pgt"].get("calibration", "none") == "none":  # the centred rule is uncalibrated
            rule = r.attrs["options"]["pgt"].get("combine", "mean")  # stores older than pgt.combine: the mean
            rules["centred"] = combine(centred, np.where(kept[:, None, None], 0.0, ard), rule)
        for cal in CALIBRATIONS:
            rules.update({other + ("" if cal == "none" else f"+{cal}"): rebuilt(r, other, cal)
                          for other in COMBINE_RULES})
        for name, maps in rules.items():
            px = pixel_metrics(maps, masks)
            scores = {"coarse": r.scores["coarse"], "stored": r.scores["combined"]}.get(name)
            img = image_metrics(scores if scores is not None else image_scores(maps, pgt), labels)
            print(f"| {path} | {name} | {100 * px['ap']:.1f} | {100 * px['f1_max']:.1f} | "
                  f"{100 * img['auroc']:.1f} | {int(kept.sum())} images |", flush=True)
            summary.setdefault(name, []).append((px["ap"], px["f1_max"], img["auroc"]))
    print(f"\nOver the {len(args.stores)} stores: mean (min) in points\n")
    print("| rule | pixel AP | pixel F1-max | image AUROC |")
    print("|---|---|---|---|")
    for name, values in summary.items():
        v = 100 * np.asarray(values)
        print(f"| {name} | " + " | ".join(f"{v[:, j].mean():.1f} ({v[:, j].min():.1f})" for j in range(3)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
