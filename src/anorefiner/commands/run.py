"""``anorefiner run``: the whole pipeline on one MVTec-layout category of your own images.

features → coarse maps → PGT (ARD) → metrics, by the same library functions the workflow uses.
Writes ``OUT/features.h5``, ``OUT/coarse.h5``, ``OUT/refined.h5``, ``OUT/metrics.csv`` (columns
``method, metric, value``; methods ``coarse``, ``ard``, ``combined``) and ``OUT/run.json``. An existing
intermediate file is reused only when the settings it records (backbone, resolution, activation, backend
and its options, seed, refiner options, ...) equal this run's; otherwise it is recomputed and the log
names the setting that differs (``--force`` recomputes everything). Each stage is a function of
:mod:`anorefiner.stages`, the same the workflow's subcommands call.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import add_pos_embed_argument

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
    p.add_argument("--category", required=True, help="the category folder under --data-root to process")
    p.add_argument("--dataset", default="mvtec_ad", help="dataset name recorded in the outputs (picks RsCIN's k list)")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="feature extractor: efficientnet_lite0 (CPU-friendly, default), resnet50, ViT-L-14-336 "
                        "(the paper's) or another open_clip name")
    p.add_argument("--backend", default="musc", help=_backend_help())
    p.add_argument("--backend-options", default="{}", help="backend options as JSON")
    p.add_argument("--resolution", type=int, default=None, help=f"backbone input size (default {DEFAULT_RESOLUTION})")
    add_pos_embed_argument(p, default="the backend's official one: bicubic_no_antialias for musc, else antialiased")
    p.add_argument("--eval-resolution", type=int, default=256, help="resolution of the stored maps and metrics")
    p.add_argument("--preset", choices=["paper", "cpu"], default="paper",
                   help="refiner defaults: the paper's, or a lighter ARD for CPUs (--options override both)")
    p.add_argument("--options", default="{}", help="refiner options JSON (sections ard, pgt, synthesis)")
    p.add_argument("--textures", default="offline", help="'offline' or a DTD root folder")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every random step (groups, pseudo-anomalies, ARD initialisation); the paper averages 5")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--no-pro", action="store_true", help="skip the PRO metric (the slowest one)")
    p.add_argument("--force", action="store_true",
                   help="recompute every intermediate file, even one made with the same settings")
    p.add_argument("--out", required=True,
                   help="output folder (reused files must match this run's settings, see above)")


def _backend_help() -> str:
    """The presets PGT can refine, from the registry (the others make maps only: rule coarse)."""
    from ..zsad import PRESETS, preset_names
    from ..zsad.registry import BACKEND_TYPES, REFINABLE_TYPES

    trained = [n for n in preset_names(REFINABLE_TYPES) if BACKEND_TYPES[PRESETS[n][0]].trainer]
    return (f"zero-shot backend preset: {', '.join(preset_names(REFINABLE_TYPES))}; the trained ones "
            f"({', '.join(trained)}) need --backend-options '{{\"checkpoint\": FILE}}' ('anorefiner train-backend'), "
            f"byo needs '{{\"maps_path\": FILE}}'")


def backbone_pos_embed(backbone: str, backend_type: str, given: str | None) -> str | None:
    """``--pos-embed`` if given, else the backend type's official resize for an open_clip backbone (MuSc's features
    resize without antialias, :attr:`~anorefiner.zsad.registry.BackendType.pos_embed`); None for a CNN."""
    from ..backbones import CNN_NAMES
    from ..zsad.registry import backend_type as kind

    if given is not None or backbone in CNN_NAMES:
        return given
    return kind(backend_type).pos_embed


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in extra.items():
        if not isinstance(values, dict):
            raise ValueError(f"--options section {section!r} must be a JSON object, got {values!r}")
        out.setdefault(section, {}).update(values)
    return out


def main(args) -> int:
    import pandas as pd

    from .. import stages
    from ..backbones import build_backbone, resolve_device
    from ..config import from_dict, json_object
    from ..data.index import index_category
    from ..io import remove_stale_temps, write_csv_atomic, write_json_atomic
    from ..provenance import store_records
    from ..log import LOG
    from ..metrics import EvalConfig
    from ..refine.pgt import RefinerOptions
    from ..zsad import PRESETS

    user = json_object(args.options, "--options")
    opts = _merge(CPU_PRESET if args.preset == "cpu" else {}, user)
    options = from_dict(RefinerOptions, opts, "refiner")
    options.validate()
    resolution = args.resolution or DEFAULT_RESOLUTION.get(args.backbone)
    if resolution is None:
        raise ValueError(f"--resolution is required for backbone {args.backbone!r}")
    if args.backend not in PRESETS:
        raise ValueError(f"--backend {args.backend!r}: expected one of {sorted(PRESETS)}")
    backend_type = PRESETS[args.backend][0]
    backend_opts = stages.backend_options(backend_type, args.backend_options, dataset=args.dataset,
                                          category=args.category, device=args.device)
    device = resolve_device(args.device)
    index = index_category(args.data_root, args.category, dataset=args.dataset)  # checks masks before any compute
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.h5" for name in ("features", "coarse", "refined")}
    reuse = not args.force
    timings: dict[str, float] = {}

    t = time.time()
    backbone = build_backbone(args.backbone, resolution, device=device,
                              pos_embed=backbone_pos_embed(args.backbone, backend_type, args.pos_embed))
    stages.features(index, backbone, paths["features"], reuse=reuse)
    timings["features_s"] = time.time() - t
    t = time.time()
    stages.coarse(paths["features"], args.backend, backend_type, backend_opts, seed=args.seed, dataset=args.dataset,
                  category=args.category, out=paths["coarse"], backbone=backbone, data_root=args.data_root,
                  reuse=reuse)
    timings["coarse_s"] = time.time() - t
    t = time.time()
    stages.refine(args.data_root, args.dataset, args.category, paths["features"], paths["coarse"], backbone=backbone,
                  backend_name=args.backend, backend_type=backend_type, backend_opts=backend_opts, options=options,
                  seed=args.seed, textures=args.textures, eval_resolution=args.eval_resolution, device=device,
                  out=paths["refined"], reuse=reuse)
    timings["pgt_s"] = time.time() - t
    t = time.time()
    eval_cfg = EvalConfig(resolution=args.eval_resolution, compute_pro=not args.no_pro)
    rows = stages.evaluate(args.data_root, args.dataset, args.category, paths["refined"], eval_cfg)
    frame = pd.DataFrame(rows, columns=["method", "metric", "value"])
    for name in ("metrics.csv", "run.json"):
        remove_stale_temps(out / name)
    write_csv_atomic(out / "metrics.csv", frame)
    timings["metrics_s"] = time.time() - t
    refined_attrs = stages.stored_attrs(paths["refined"])
    write_json_atomic(out / "run.json", {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                                         "resolution": resolution, "options": opts, "timings": timings,
                                         "pgt_timings": refined_attrs.get("timings"),
                                         "provenance": store_records(refined_attrs)})
    table = frame.pivot(index="metric", columns="method", values="value")
    LOG.info("run %s: metrics -> %s\n%s", args.category, out / "metrics.csv", table.round(4).to_string())
    return 0
