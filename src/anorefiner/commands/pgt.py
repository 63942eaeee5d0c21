"""``anorefiner pgt``: refine one category's coarse maps with AnoRefiner (ARD + PGT) → refined store."""

from __future__ import annotations

import argparse
import json

NAME = "pgt"
HELP = "AnoRefiner: progressive group-wise test-time training of the ARD -> refined store (coarse/ard/combined)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="dataset root (MVTec layout): the images pseudo-anomalies are made from")
    p.add_argument("--dataset", required=True, help="mvtec_ad, visa or demo")
    p.add_argument("--category", required=True)
    p.add_argument("--features", required=True, help="feature cache HDF5 of the category")
    p.add_argument("--coarse", required=True, help="coarse store HDF5 of the category")
    p.add_argument("--backbone", required=True, help="backbone of the feature cache (pseudo-anomaly features)")
    p.add_argument("--resolution", type=int, required=True, help="backbone input resolution R")
    p.add_argument("--pretrained", default="default", help="backbone weights as for 'anorefiner features' ('none' = random)")
    p.add_argument("--backend-type", required=True, choices=["musc", "paclip", "byo"])
    p.add_argument("--backend-name", default=None, help="config name (musc, musc_star, musc_cnn, ...); default: the type")
    p.add_argument("--backend-options", default="{}", help="backend options as JSON (config backends.<name>.options)")
    p.add_argument("--options", default="{}", help="JSON with sections ard, pgt, synthesis (a variant's settings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--textures", default="offline", help="'offline' (scikit-image stand-ins) or a DTD root folder")
    p.add_argument("--eval-resolution", type=int, default=518, help="resolution E of the stored maps (MuSc: 518)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", required=True, help="refined store to write (results/refined/.../<category>.h5)")


def load_textures(spec: str, seed: int):
    """``offline`` → scikit-image stand-ins; anything else is a DTD root folder."""
    from ..data.textures import texture_source

    if spec == "offline":
        return texture_source("offline", seed=seed)
    return texture_source("dtd", dtd_root=spec)


def parse_backend_options(text: str, backend_type: str, dataset: str, device: str) -> dict:
    from ..config import ConfigError

    try:
        options = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise ConfigError(f"--backend-options is not valid JSON: {err}") from err
    if not isinstance(options, dict):
        raise ConfigError("--backend-options must be a JSON object")
    if backend_type in ("musc", "paclip"):
        options.setdefault("device", device)
    if backend_type == "musc":
        options.setdefault("dataset", dataset)
    elif backend_type == "byo":
        options.setdefault("musc", {}).setdefault("dataset", dataset)
    return options


def build_for_cache(feats, backbone_name: str, resolution: int, pretrained: str, device):
    """The backbone that made ``feats`` (same layers); a different resolution or weights is an error."""
    from ..backbones import build_backbone

    layers = feats.attrs.get("layers")
    pretrained = None if str(pretrained).lower() == "none" else pretrained
    backbone = build_backbone(backbone_name, resolution, layers=layers, pretrained=pretrained, device=device,
                              activation=feats.attrs.get("activation"))
    for key in ("backbone", "resolution", "weights"):
        cached = feats.attrs.get(key)
        if cached is not None and str(cached) != str(backbone.identity[key]):
            raise ValueError(f"feature cache attribute {key!r} is {cached!r} but --backbone/--resolution/--pretrained "
                             f"give {backbone.identity[key]!r}: pseudo-anomaly features must come from the same backbone")
    return backbone


def main(args) -> int:
    import numpy as np

    from ..backbones import resolve_device
    from ..cache import read_features
    from ..config import parse_json_options
    from ..data.index import test_rows
    from ..log import LOG
    from ..refine.pgt import RefinerOptions, run_pgt
    from ..refine.store import write_refined
    from ..seeding import seed_everything
    from ..zsad import get_backend
    from ..zsad.store import read_coarse

    options = parse_json_options(args.options, RefinerOptions, "refiner")
    options.validate()
    seed_everything(args.seed)
    device = resolve_device(args.device)
    feats = read_features(args.features)
    coarse = read_coarse(args.coarse, expect_ids=feats.ids)
    df = test_rows(args.root, args.category, feats.ids, dataset=args.dataset)
    # Table 4 only; run_pgt logs loudly that ground-truth labels are used.
    labels = df["label"].to_numpy(dtype=np.int64) if options.pgt.contamination_ratio > 0 else None
    backbone = build_for_cache(feats, args.backbone, args.resolution, args.pretrained, device)
    backend_opts = parse_backend_options(args.backend_options, args.backend_type, args.dataset, args.device)
    backend = get_backend(args.backend_name or args.backend_type, backend_opts, backbone=backbone, seed=args.seed)
    refined = run_pgt(feats, coarse, list(df["image_path"]), backbone, backend, options, seed=args.seed,
                      textures=load_textures(args.textures, args.seed), eval_resolution=args.eval_resolution,
                      labels=labels, device=device)
    refined.attrs.update({"dataset": args.dataset, "category": args.category, "features": str(args.features),
                          "coarse": str(args.coarse), "backend": args.backend_name or args.backend_type,
                          "backend_options": backend_opts, "textures": args.textures, "device": str(device)})
    write_refined(args.out, refined)
    LOG.info("pgt %s/%s: %d images in %d groups, %.1f s -> %s", args.dataset, args.category, len(refined.ids),
             refined.attrs["n_groups"], refined.attrs["timings"]["total_s"], args.out)
    return 0
