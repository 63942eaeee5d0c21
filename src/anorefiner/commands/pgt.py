"""``anorefiner pgt``: refine one category's coarse maps with AnoRefiner (ARD + PGT) → refined store."""

from __future__ import annotations

import argparse

from ..zsad import preset_names
from ..zsad.registry import REFINABLE_TYPES

NAME = "pgt"
HELP = "AnoRefiner: progressive group-wise test-time training of the ARD -> refined store (coarse/ard/combined)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True,
                   help="dataset root (MVTec layout): the images pseudo-anomalies are made from")
    p.add_argument("--dataset", required=True, help="mvtec_ad, visa or demo")
    p.add_argument("--category", required=True, help="category folder under the dataset root")
    p.add_argument("--features", required=True, help="feature cache HDF5 of the category")
    p.add_argument("--coarse", required=True, help="coarse store HDF5 of the category")
    p.add_argument("--backbone", required=True, help="backbone of the feature cache (pseudo-anomaly features)")
    p.add_argument("--resolution", type=int, required=True, help="backbone input resolution R")
    p.add_argument("--pretrained", default="default",
                   help="backbone weights as for 'anorefiner features' ('none' = random)")
    p.add_argument("--backend-type", required=True, choices=list(REFINABLE_TYPES), help="type of the refined backend")
    p.add_argument("--backend-name", default=None,
                   help=f"config name (backends.<name>; presets: {', '.join(preset_names(REFINABLE_TYPES))}); "
                        "default: the type")
    p.add_argument("--backend-options", default="{}", help="backend options as JSON (config backends.<name>.options)")
    p.add_argument("--options", default="{}", help="JSON with sections ard, pgt, synthesis (a variant's settings)")
    p.add_argument("--seed", type=int, default=0, help="run seed (groups, pseudo-anomalies, ARD initialisation)")
    p.add_argument("--textures", default="offline", help="'offline' (scikit-image stand-ins) or a DTD root folder")
    p.add_argument("--seas-model", default=None,
                   help="trained SeaS model folder (rule train_seas): the pseudo-anomalies of synthesis.method 'seas'")
    p.add_argument("--eval-resolution", type=int, default=518, help="resolution E of the stored maps (MuSc: 518)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--out", required=True, help="refined store to write (results/refined/.../<category>.h5)")


def main(args) -> int:
    from .. import stages
    from ..backbones import resolve_device
    from ..cache import read_attrs
    from ..config import parse_json_options
    from ..refine.pgt import RefinerOptions

    options = parse_json_options(args.options, RefinerOptions, "refiner")
    options.validate()
    device = resolve_device(args.device)
    backbone = stages.cache_backbone(read_attrs(args.features), args.backbone, args.resolution, args.pretrained,
                                     device)
    backend_name = args.backend_name or args.backend_type
    backend_opts = stages.backend_options(args.backend_type, args.backend_options, dataset=args.dataset,
                                          category=args.category, device=args.device)
    stages.refine(args.root, args.dataset, args.category, args.features, args.coarse, backbone=backbone,
                  backend_name=backend_name, backend_type=args.backend_type, backend_opts=backend_opts,
                  options=options, seed=args.seed, textures=args.textures, eval_resolution=args.eval_resolution,
                  device=device, out=args.out, seas_model=args.seas_model)
    return 0
