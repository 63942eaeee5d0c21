"""Does the refiner pay for itself? coarse vs ARD alone vs combined, over categories, seeds and texture sources.

For each category the features and the coarse maps are computed once (``OUT/<category>/{features,coarse}.h5``,
by the pipeline's stages, reused when made with the same settings; a backend whose maps depend on the seed, such as
``musc_star``'s shuffled groups, gets ``coarse_seed<s>.h5`` per run seed, as the workflow's ``coarse_seed`` gives it),
then PGT + metrics run for every (texture source, variant, seed). Printed per
category and texture source, as mean ± std over seeds: pixel AP / F1-max / AUROC / PRO and image AUROC of
``coarse``, ``ard`` and ``combined``, on all test images and on groups 2 and later only (refined by an ARD trained
on an earlier group; group 1 is refined by its own ARD under ``first_group_ard: self``, and under the paper's rule
its ``ard`` map is a stand-in, see ``PGTConfig.first_group_ard``), and per PGT group. The baseline is the coarse map:
the ``gain`` rows are ``combined − coarse`` in points.

    python benchmarks/refine_gain.py --data-root ../shared/data/mvtec_ad --categories bottle \
        --seeds 0 1 2 --textures offline ../shared/data/dtd --out benchmarks/out/refine_gain

``--variant NAME=JSON`` (repeatable) adds refiner option overrides on top of ``--preset``/``--options``;
``default`` (no override) runs first unless ``--no-default``. Tidy rows go to ``OUT/results.csv`` (one row per category,
textures, variant, seed, subset, method, metric; ``code``: the commit that made the refined store) and the summary to
``OUT/summary.md``. A store is reused when its settings match, whatever code made it (``anorefiner.stages``): the
summary opens with the stores that other code made, so a rerun after a fix in the refiner cannot pass their numbers
off as the fixed code's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

PIXEL = ("pixel_ap", "pixel_f1_max", "pixel_auroc", "pixel_pro")
SHOWN = PIXEL + ("image_auroc",)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="MVTec-layout root holding the categories")
    p.add_argument("--categories", nargs="+", required=True)
    p.add_argument("--dataset", default="mvtec_ad")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--textures", nargs="+", default=["offline"], help="'offline' and/or DTD root folders")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--backend", default="musc_cnn")
    p.add_argument("--preset", choices=["paper", "cpu"], default="cpu")
    p.add_argument("--options", default="{}", help="refiner options JSON applied to every variant")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON", help="extra variant (repeatable)")
    p.add_argument("--no-default", action="store_true", help="run only the --variant entries")
    p.add_argument("--eval-resolution", type=int, default=256)
    p.add_argument("--no-pro", action="store_true")
    p.add_argument("--no-figures", action="store_true", help="skip the per-group diagnostic figure of each run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/out/refine_gain")
    return p.parse_args(argv)


def prepare_category(args, category: str, out: Path):
    """Features and the seed-0 coarse maps of one category, by the pipeline's stages (reused when their settings
    match)."""
    from anorefiner import stages
    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import index_category
    from anorefiner.zsad import PRESETS

    out.mkdir(parents=True, exist_ok=True)
    backbone = build_backbone(args.backbone, args.resolution, device=args.device)
    index = index_category(args.data_root, category, dataset=args.dataset)
    feat_path = stages.features(index, backbone, out / "features.h5", reuse=True)
    backend_type = PRESETS[args.backend][0]
    opts = stages.backend_options(backend_type, {}, dataset=args.dataset, category=category, device=args.device)
    coarse_path = coarse_for_seed(args, category, out, 0, backbone, backend_type, opts, feat_path)
    return backbone, backend_type, opts, feat_path, coarse_path


def coarse_for_seed(args, category: str, out: Path, seed: int, backbone, backend_type: str, opts: dict, feat_path):
    """The coarse store that serves run ``seed``: the seed-0 one (``coarse.h5``) for a backend whose maps do not
    depend on the seed, else its own (``coarse_seed<s>.h5``). MuSc*'s groups are drawn with the seed: PGT's
    groups and the pseudo-anomalies' references (the backend built with the run seed) follow it, so a seed-1 run
    on seed-0 maps mixed two groupings."""
    from anorefiner import stages
    from anorefiner.zsad import seed_dependent_backend

    own = seed != 0 and seed_dependent_backend(args.backend, backend_type, opts)
    return stages.coarse(feat_path, args.backend, backend_type, opts, seed=seed if own else 0, dataset=args.dataset,
                         category=category, out=out / (f"coarse_seed{seed}.h5" if own else "coarse.h5"),
                         backbone=backbone, data_root=args.data_root, reuse=True)


def merged_options(args, override: dict):
    """``--preset``, then ``--options``, then the variant's overrides (as ``anorefiner run`` merges them)."""
    from anorefiner.commands.run import CPU_PRESET, _merge
    from anorefiner.config import from_dict
    from anorefiner.refine.pgt import RefinerOptions

    opts = _merge(_merge(CPU_PRESET if args.preset == "cpu" else {}, json.loads(args.options)), override)
    options = from_dict(RefinerOptions, opts, "refiner")
    options.validate()
    return options


def normalised(refined, maps=None):
    """``maps`` (default: the stored ``coarse`` output) on PGT's coarse scale (``attrs["coarse_norm"]``), each
    group's on the scale it was combined on (``groups``: one (lo, hi) per group; older stores hold only the last,
    which is every group's under the default ``first_group``)."""
    norm = refined.attrs["coarse_norm"]
    maps = refined.maps["coarse"] if maps is None else maps
    if norm["mode"] == "none":
        return maps
    groups = np.asarray(refined.groups)
    scales = norm.get("groups")
    if scales is None:
        if norm["mode"] != "first_group":
            raise ValueError(f"store made with pgt.coarse_norm={norm['mode']!r} records only its last coarse scale, "
                             "not each group's: its combined maps cannot be rebuilt")
        scales = [[norm["lo"], norm["hi"]]] * (int(groups.max()) + 1)
    out = np.empty_like(maps)
    for k, (lo, hi) in enumerate(scales):  # as CoarseNorm scales them, so the same float32 numbers
        out[groups == k] = (maps[groups == k] - lo) / max(hi - lo, 1e-12)
    return out


def rebuilt(refined, rule: str | None = None, calibration: str | None = None):
    """``combined`` rebuilt from the stored ``coarse`` and ``ard`` maps with every group refined (no safeguard), by
    ``rule``/``calibration`` (default: the run's own; stores older than these options used "mean" and "none")."""
    from anorefiner.refine.combine import calibrate, combine

    pgt = refined.attrs.get("options", {}).get("pgt", {})
    rule = rule or pgt.get("combine", "mean")
    calibration = calibration or pgt.get("calibration", "none")
    coarse_n, ard, groups = normalised(refined), refined.maps["ard"], np.asarray(refined.groups)
    if calibration != "none":
        ard = ard.copy()
        for k in np.unique(groups):
            ard[groups == k] = calibrate(coarse_n[groups == k], ard[groups == k], calibration)
    out = combine(coarse_n, ard, rule)
    if pgt.get("first_group_ard") == "coarse":  # the paper's group 1: its coarse map itself, under every rule
        out[groups == 0] = coarse_n[groups == 0]
    return out


def unguarded(refined):
    """``combined`` as it would be without the safeguard (the ARD maps are stored for kept groups too, and the
    training is the same either way). None when there is nothing to rebuild or it cannot be rebuilt."""
    pgt = refined.attrs.get("options", {}).get("pgt", {})
    kept = [v for v in refined.attrs.get("safeguard", []) if not v["refined"]]
    if not kept or not pgt.get("coarse_align_corners", True):
        return None
    return rebuilt(refined)


def evaluate(refined, masks, labels, args) -> list[dict]:
    """Tidy metric rows: all images, the groups the ARD refined, and each PGT group on its own."""
    from anorefiner.metrics import EvalConfig, evaluate_category
    from anorefiner.refine.pgt import image_scores

    cfg = EvalConfig(resolution=args.eval_resolution, compute_pro=not args.no_pro)
    rows = []
    groups = np.asarray(refined.groups)
    subsets = {"all": np.ones(len(refined.ids), bool), "groups_2_on": groups > 0}
    subsets.update({f"group{g + 1}": groups == g for g in sorted(set(groups.tolist()))})
    methods = dict(refined.maps)
    scores = dict(refined.scores)
    rebuilt = unguarded(refined)
    if rebuilt is not None:
        from anorefiner.config import from_dict
        from anorefiner.refine.pgt import PGTConfig

        methods["unguarded"] = rebuilt
        scores["unguarded"] = image_scores(rebuilt, from_dict(PGTConfig, refined.attrs["options"]["pgt"]))
    for subset, keep in subsets.items():
        if not keep.any() or labels[keep].min() == labels[keep].max():
            continue
        chosen = {m: (methods[m][keep], scores[m][keep]) for m in methods}
        if subset.startswith("group"):  # per group: pixel metrics of coarse and combined only
            chosen = {m: chosen[m] for m in ("coarse", "combined")}
        for row in evaluate_category(chosen, masks[keep], labels[keep], cfg):
            rows.append({**row, "subset": subset})
    return rows


def diagnose(refined, masks, labels) -> list[dict]:
    """Why the ARD misses real defects (issue 26), as tidy rows of subset "diagnosis": the normalised coarse map's
    median inside real defects and on good images next to the pseudo-anomalies' (``attrs["fit"]``), the share of
    defect pixels the ARD leaves below 0.1, and the share of good-image pixels where it says > 0.5."""
    from anorefiner.metrics.evaluate import resize_masks

    coarse_n = normalised(refined)
    ard = refined.maps["ard"]
    defect = resize_masks(masks, ard.shape[-2:], "nearest").astype(bool)  # as the metrics stage resizes masks
    good = labels == 0
    fit = refined.attrs.get("fit", [])
    values = {"real_coarse_median_in_mask": float(np.median(coarse_n[defect])),
              "real_coarse_median_good_images": float(np.median(coarse_n[good])),
              "pseudo_coarse_median_in_mask": float(np.nanmean([f.get("pseudo_coarse_median_in_mask", np.nan)
                                                                for f in fit])) if fit else float("nan"),
              "pseudo_coarse_median_outside": float(np.nanmean([f.get("pseudo_coarse_median_outside", np.nan)
                                                                for f in fit])) if fit else float("nan"),
              "ard_defect_pixels_below_0.1": float((ard[defect] < 0.1).mean()),
              "ard_good_pixels_above_0.5": float((ard[good] > 0.5).mean()),
              "eval_minus_train_loss": float(np.mean([f["eval_mode"] - f["train_mode"] for f in fit])) if fit
              else float("nan")}
    return [{"subset": "diagnosis", "method": "ard", "metric": k, "value": v} for k, v in values.items()]


def diagnosis_table(frame: pd.DataFrame) -> str:
    part = frame[frame.subset == "diagnosis"]
    if part.empty:
        return ""
    stats = part.groupby(["category", "textures", "variant", "metric"], sort=False)["value"].mean().unstack("metric")
    cols = list(part.metric.drop_duplicates())
    lines = ["\n### diagnosis (mean over seeds)\n", "| category / textures / variant | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    for key, row in stats.iterrows():
        lines.append(f"| {' / '.join(map(str, key))} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def group_table(frame: pd.DataFrame, verdicts: dict) -> str:
    """Per category, textures, variant and PGT group: pixel AP of coarse and combined (mean over seeds), whether
    the ARD helped (combined > coarse), and how often the safeguard let the ARD refine the group."""
    part = frame[frame.subset.str.match(r"group\d+$") & (frame.metric == "pixel_ap")]
    if part.empty:
        return ""
    lines = ["\n### per PGT group: pixel AP (mean over seeds)\n",
             "| category / textures / variant | group | coarse | combined | ARD helped (seeds) | safeguard let it refine |",
             "|---|---|---|---|---|---|"]
    keys = ["category", "textures", "variant", "subset"]
    for key, rows in part.groupby(keys, sort=False):
        wide = rows.pivot_table(index="seed", columns="method", values="value")
        helped = int((wide["combined"] > wide["coarse"]).sum())
        group = int(key[3][5:])
        decided = [v for (c, t, var, seed), vs in verdicts.items() if (c, t, var) == key[:3]
                   for v in vs if v["group"] == group]
        guard = f"{sum(v['refined'] for v in decided)}/{len(decided)}" if decided else "off"
        lines.append(f"| {' / '.join(map(str, key[:3]))} | {group} | {100 * wide['coarse'].mean():.1f} | "
                     f"{100 * wide['combined'].mean():.1f} | {helped}/{len(wide)} | {guard} |")
    return "\n".join(lines)


def summarise(frame: pd.DataFrame) -> str:
    lines = []
    keys = ["category", "textures", "variant", "subset"]
    for key, part in frame.groupby(keys, sort=False):
        n_seeds = part["seed"].nunique()
        lines.append(f"\n### {' / '.join(str(k) for k in key)} ({n_seeds} seed{'s' if n_seeds > 1 else ''})\n")
        lines.append("| method | " + " | ".join(SHOWN) + " |")
        lines.append("|---|" + "---|" * len(SHOWN))
        stats = part[part.metric.isin(SHOWN)].groupby(["method", "metric"])["value"].agg(["mean", "std"])
        for method in ("coarse", "ard", "combined", "unguarded"):
            cells = []
            for metric in SHOWN:
                if (method, metric) not in stats.index:
                    cells.append("")
                    continue
                mean, std = stats.loc[(method, metric)]
                cells.append(f"{100 * mean:.1f} ± {100 * (0 if np.isnan(std) else std):.1f}")
            if any(cells):  # "unguarded" only exists where the safeguard kept a group
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        wide = part.pivot_table(index=["seed", "metric"], columns="method", values="value")
        gain = (wide["combined"] - wide["coarse"]).unstack("metric")
        cells = [f"{100 * gain[m].mean():+.1f} (min {100 * gain[m].min():+.1f})" if m in gain else "" for m in SHOWN]
        lines.append("| gain combined − coarse | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def texture_tag(spec: str) -> str:
    """The name a texture source has in OUT's folders and results.csv: ``offline``, or ``dtd`` for a DTD root."""
    return "offline" if spec == "offline" else "dtd"


def main(argv=None) -> int:
    args = parse_args(argv)
    from anorefiner.log import setup_logging

    setup_logging()
    from anorefiner import stages
    from anorefiner.data.index import index_category, load_image
    from anorefiner.figures import group_diagnostics
    from anorefiner.log import LOG
    from anorefiner.provenance import code_label, code_version
    from anorefiner.refine.store import read_refined

    out = Path(args.out)
    now = code_label(code_version())
    stale: list[str] = []  # reused stores made by other code
    tags = [texture_tag(t) for t in args.textures]
    if len(set(tags)) < len(tags):
        raise SystemExit(f"--textures {' '.join(args.textures)}: two sources would share OUT/<category>/<tag> and the "
                         "tag in results.csv (offline, dtd); run one DTD root per --out")
    variants = {} if args.no_default else {"default": {}}
    for spec in args.variant:
        name, _, text = spec.partition("=")
        variants[name] = json.loads(text)
    rows: list[dict] = []
    verdicts: dict = {}  # (category, textures, variant, seed) -> the safeguard's per-group checks
    t_all = time.time()
    for category in args.categories:
        backbone, backend_type, backend_opts, feat_path, coarse_path = prepare_category(args, category, out / category)
        ids = stages.stored_ids(coarse_path)
        masks, labels = stages.ground_truth(args.data_root, args.dataset, category, ids)
        index = index_category(args.data_root, category, dataset=args.dataset).set_index("image_id").loc[ids]
        for tex in args.textures:
            tex_tag = texture_tag(tex)
            for vname, override in variants.items():
                options = merged_options(args, override)
                for seed in args.seeds:
                    seed_coarse = coarse_for_seed(args, category, out / category, seed, backbone, backend_type,
                                                  backend_opts, feat_path)
                    path = stages.refine(args.data_root, args.dataset, category, feat_path, seed_coarse,
                                         backbone=backbone, backend_name=args.backend, backend_type=backend_type,
                                         backend_opts=backend_opts, options=options, seed=seed, textures=tex,
                                         eval_resolution=args.eval_resolution, device=args.device, reuse=True,
                                         out=out / category / tex_tag / vname / f"seed{seed}" / "refined.h5")
                    refined = read_refined(path)
                    made_by = code_label(refined.attrs.get("run", {}).get("code"))
                    if made_by != now:
                        stale.append(f"{path} (made by {made_by})")
                        LOG.warning("%s was made by other code (%s) than this run's (%s)", path, made_by, now)
                    verdicts[(category, tex_tag, vname, seed)] = refined.attrs.get("safeguard", [])
                    for row in evaluate(refined, masks, labels, args) + diagnose(refined, masks, labels):
                        rows.append({"category": category, "textures": tex_tag, "variant": vname, "seed": seed,
                                     "code": made_by, **row})
                    if not args.no_figures:
                        figure = group_diagnostics(refined, [load_image(p) for p in index.image_path], masks,
                                                   path.with_name("groups.png"),
                                                   f"{category} / {tex_tag} / {vname} / seed {seed}")
                        print(f"group diagnostics -> {figure}")
                    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    frame = pd.DataFrame(rows)
    text = "\n".join([summarise(frame[~frame.subset.str.match(r"group\d+$|diagnosis")]),
                      group_table(frame, verdicts), diagnosis_table(frame)])
    if stale:
        text = "\n".join([f"**{len(stale)} of the refined stores were reused from other code than this run's ({now})**; "
                          "rerun them (a fresh --out) to measure this code:", *(f"- {s}" for s in stale), text])
    (out / "summary.md").write_text(text + "\n")
    print(text)
    print(f"\n{len(frame)} rows -> {out / 'results.csv'}; summary -> {out / 'summary.md'}; "
          f"{time.time() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
