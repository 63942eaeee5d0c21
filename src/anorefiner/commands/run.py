"""``anorefiner run``: the whole pipeline on one MVTec-layout category of your own images.

features → coarse maps → PGT (ARD) → metrics, by the same library functions the workflow uses.
Writes ``OUT/features.h5``, ``OUT/coarse.h5``, ``OUT/refined.h5``, ``OUT/metrics.csv`` (columns
``method, metric, value``; methods ``coarse``, ``ard``, ``combined``) and ``OUT/run.json``. Existing
intermediate files are reused (delete them, or pass ``--force``, to recompute).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

NAME = "run"
HELP = "one category end to end (features -> coarse -> PGT -> metrics) for your own MVTec-layout images"

# Input resolution per backbone when --resolution is not given (MuSc/paper: 518 for ViT-L/14).
DEFAULT_RESOLUTION = {"ViT-L-14-336": 518, "resnet50": 512, "efficientnet_lite0": 256}

# ``--preset cpu``: a lighter ARD for 2 CPU cores (what the bottle check in the README used), trained at lr 0.01:
# at the paper's 1e-3 its Dice loss only fell 0.92 -> 0.75 in 20 epochs on bottle (0.18 at 0.01), as in
# config/demo.yaml. The paper's settings (dataclass defaults) are ``--preset paper``.
CPU_PRESET = {"ard": {"feat_channels": 64, "anomaly_channels": 16, "aa_channels": 48, "head_channels": 32,
                      "ar_channels": [64, 32]},
              "pgt": {"lr": 0.01}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", required=True, help="folder holding <category>/{train,test,ground_truth}")
    p.add_argument("--category", required=True)
    p.add_argument("--dataset", default="mvtec_ad", help="dataset name recorded in the outputs (picks RsCIN's k list)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--backend", default="musc", help="zero-shot backend name (musc, musc_star, musc_cnn, paclip)")
    p.add_argument("--backend-options", default="{}", help="backend options as JSON")
    p.add_argument("--resolution", type=int, default=None, help=f"backbone input size (default {DEFAULT_RESOLUTION})")
    p.add_argument("--eval-resolution", type=int, default=256, help="resolution of the stored maps and metrics")
    p.add_argument("--preset", choices=["paper", "cpu"], default="paper",
                   help="refiner defaults: the paper's, or a lighter ARD for CPUs (--options override both)")
    p.add_argument("--options", default="{}", help="refiner options JSON (sections ard, pgt, synthesis)")
    p.add_argument("--textures", default="offline", help="'offline' or a DTD root folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-pro", action="store_true", help="skip the PRO metric (the slowest one)")
    p.add_argument("--force", action="store_true", help="recompute intermediate files that already exist")
    p.add_argument("--out", required=True, help="output folder")


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in extra.items():
        if not isinstance(values, dict):
            raise ValueError(f"--options section {section!r} must be a JSON object, got {values!r}")
        out.setdefault(section, {}).update(values)
    return out


def main(args) -> int:
    import numpy as np
    import pandas as pd

    from ..backbones import build_backbone, resolve_device
    from ..cache import extract_features, read_features
    from ..config import ConfigError, from_dict
    from ..data.index import index_category, test_rows
    from ..io import write_csv_atomic, write_json_atomic
    from ..log import LOG
    from ..metrics import EvalConfig, evaluate_category
    from ..refine.pgt import RefinerOptions, run_pgt
    from ..refine.store import write_refined
    from ..seeding import seed_everything
    from ..zsad import PRESETS, get_backend
    from ..zsad.store import read_coarse, write_coarse
    from .metrics import ground_truth
    from .pgt import load_textures, parse_backend_options

    try:
        user = json.loads(args.options or "{}")
    except json.JSONDecodeError as err:
        raise ConfigError(f"--options is not valid JSON: {err}") from err
    opts = _merge(CPU_PRESET if args.preset == "cpu" else {}, user)
    options = from_dict(RefinerOptions, opts, "refiner")
    options.validate()
    resolution = args.resolution or DEFAULT_RESOLUTION.get(args.backbone)
    if resolution is None:
        raise ValueError(f"--resolution is required for backbone {args.backbone!r}")
    if args.backend not in PRESETS:
        raise ValueError(f"--backend {args.backend!r}: expected one of {sorted(PRESETS)}")
    seed_everything(args.seed)
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    index = index_category(args.data_root, args.category, dataset=args.dataset)
    backbone = build_backbone(args.backbone, resolution, device=device)
    feat_path = out / "features.h5"
    t = time.time()
    if args.force or not feat_path.is_file():
        extract_features(index, backbone, feat_path, expected_attrs={"dataset": args.dataset, "category": args.category})
    else:
        LOG.info("run: reusing %s", feat_path)
    feats = read_features(feat_path, expect={"backbone": args.backbone, "resolution": resolution})
    timings["features_s"] = time.time() - t

    backend_type = PRESETS[args.backend][0]
    backend_opts = parse_backend_options(args.backend_options, backend_type, args.dataset, args.device)
    backend = get_backend(args.backend, backend_opts, backbone=backbone, seed=args.seed)
    coarse_path = out / "coarse.h5"
    t = time.time()
    if args.force or not coarse_path.is_file():
        res = backend.coarse(feats)
        write_coarse(coarse_path, feats.ids, res.maps, res.scores,
                     {"backend": args.backend, "options": backend_opts, "seed": args.seed, "features": str(feat_path)})
    else:
        LOG.info("run: reusing %s", coarse_path)
    coarse = read_coarse(coarse_path, expect_ids=feats.ids)
    timings["coarse_s"] = time.time() - t

    test = test_rows(args.data_root, args.category, feats.ids, dataset=args.dataset)
    labels = test["label"].to_numpy(dtype=np.int64) if options.pgt.contamination_ratio > 0 else None
    t = time.time()
    refined = run_pgt(feats, coarse, list(test["image_path"]), backbone, backend, options, seed=args.seed,
                      textures=load_textures(args.textures, args.seed), eval_resolution=args.eval_resolution,
                      labels=labels, device=device)
    refined.attrs.update({"dataset": args.dataset, "category": args.category, "backend": args.backend,
                          "backend_options": backend_opts, "textures": args.textures, "device": str(device)})
    write_refined(out / "refined.h5", refined)
    timings["pgt_s"] = time.time() - t

    t = time.time()
    masks, gt_labels = ground_truth(args.data_root, args.dataset, args.category, refined.ids)
    eval_cfg = EvalConfig(resolution=args.eval_resolution, compute_pro=not args.no_pro)
    rows = evaluate_category({m: (refined.maps[m], refined.scores[m]) for m in refined.maps}, masks, gt_labels, eval_cfg)
    frame = pd.DataFrame(rows, columns=["method", "metric", "value"])
    write_csv_atomic(out / "metrics.csv", frame)
    timings["metrics_s"] = time.time() - t
    write_json_atomic(out / "run.json", {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                                         "resolution": resolution, "options": opts, "timings": timings,
                                         "pgt_timings": refined.attrs["timings"]})
    table = frame.pivot(index="metric", columns="method", values="value")
    LOG.info("run %s: metrics -> %s\n%s", args.category, out / "metrics.csv", table.round(4).to_string())
    return 0
