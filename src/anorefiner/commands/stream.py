"""``anorefiner stream``: AnoRefiner on a production line: watch a folder (or read paths from stdin) and write
each image's coarse and refined maps as it arrives, training the ARD group by group in the background (PGT).

Writes ``OUT/results.jsonl`` (one line per image), ``OUT/maps/*.npz``, ``OUT/overlays/*.png``,
``OUT/groups.jsonl`` (one line per trained group) and ``OUT/state/`` (settings, ARD checkpoint). Rerun the same
command to continue after a stop or a crash. docs/stream.md.
"""

from __future__ import annotations

import argparse
import json
import sys

NAME = "stream"
HELP = "production line: score and refine images as they arrive in a folder (or on stdin), PGT in the background"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .run import DEFAULT_RESOLUTION

    p.add_argument("--input", required=True, help="folder to watch for new images, or '-' for paths on stdin")
    p.add_argument("--category", required=True, help="product name (the class name of CLIP backends' prompts)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="feature extractor (as for 'anorefiner run')")
    p.add_argument("--resolution", type=int, default=None, help=f"backbone input size (default {DEFAULT_RESOLUTION})")
    p.add_argument("--pretrained", default="default", help="backbone weights ('none' = random, for tests)")
    p.add_argument("--backend", default="musc",
                   help="online backend preset: musc (window of earlier images), april_gan, vcp_clip, bayes_pfl "
                        "(these two with class_minmax: false); aa_clip (class_minmax: false), winclip, anomalyclip, "
                        "adaclip with --no-refine")
    p.add_argument("--backend-options", default="{}", help="backend options as JSON")
    p.add_argument("--dataset", default="mvtec_ad", help="dataset name the backend's defaults follow")
    p.add_argument("--preset", choices=["paper", "cpu"], default="paper",
                   help="refiner defaults: the paper's, or the lighter ARD for CPUs (as 'anorefiner run')")
    p.add_argument("--options", default="{}", help="refiner options JSON (sections ard, pgt, synthesis)")
    p.add_argument("--stream-options", default="{}", help="StreamConfig JSON (docs/stream.md); the flags below win")
    p.add_argument("--window", type=int, default=None, help="MuSc: images before each one it is scored against (30)")
    p.add_argument("--eval-resolution", type=int, default=None, help="side of the stored maps (256)")
    p.add_argument("--max-images", type=int, default=None, help="stop once this many images are scored (all runs)")
    p.add_argument("--idle-timeout", type=float, default=None, help="stop after this many seconds without input")
    p.add_argument("--wait-for-ard", action="store_true",
                   help="deterministic: wait for group k's ARD before scoring group k+1 (else scoring never waits)")
    p.add_argument("--no-refine", action="store_true", help="coarse maps only (no ARD training)")
    p.add_argument("--no-overlay", action="store_true", help="no PNG overlays")
    p.add_argument("--textures", default="offline", help="'offline' or a DTD root folder (pseudo-anomalies)")
    p.add_argument("--seed", type=int, default=0, help="seed of the ARD initialisation and the pseudo-anomalies")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--out", required=True, help="output folder (rerun into it to continue)")


def stream_config(args):
    from ..config import from_dict, json_object
    from ..stream import StreamConfig

    values = json_object(args.stream_options, "--stream-options")
    flags = {"window": args.window, "eval_resolution": args.eval_resolution, "max_images": args.max_images,
             "idle_timeout_s": args.idle_timeout}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.wait_for_ard:
        values["wait_for_ard"] = True
    if args.no_refine:
        values["refine"] = False
    if args.no_overlay:
        values["overlay"] = False
    config = from_dict(StreamConfig, values, "--stream-options")
    config.validate()
    return config


def main(args) -> int:
    from .. import stages
    from ..backbones import build_backbone, resolve_device
    from ..config import from_dict, json_object
    from ..log import LOG
    from ..refine.pgt import RefinerOptions
    from ..seeding import seed_everything
    from ..stream import run_stream
    from ..zsad import PRESETS
    from .run import CPU_PRESET, DEFAULT_RESOLUTION, _merge

    config = stream_config(args)
    options = from_dict(RefinerOptions, _merge(CPU_PRESET if args.preset == "cpu" else {},
                                               json_object(args.options, "--options")), "refiner")
    if args.backend not in PRESETS:
        raise ValueError(f"--backend {args.backend!r}: expected one of {sorted(PRESETS)}")
    resolution = args.resolution or DEFAULT_RESOLUTION.get(args.backbone)
    if resolution is None:
        raise ValueError(f"--resolution is required for backbone {args.backbone!r}")
    device = resolve_device(args.device)
    seed_everything(args.seed)
    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    backbone = build_backbone(args.backbone, resolution, pretrained=pretrained, device=device, seed=args.seed)
    backend_type = PRESETS[args.backend][0]
    backend_opts = stages.backend_options(backend_type, args.backend_options, dataset=args.dataset,
                                          category=args.category, device=args.device)
    backend = stages.make_backend(args.backend, backend_type, backend_opts, backbone=backbone, seed=args.seed)
    textures = stages.load_textures(args.textures, args.seed, args.category) if config.refine else ()
    inputs = sys.stdin if args.input == "-" else args.input
    summary = run_stream(inputs, args.out, backbone=backbone, backend_name=args.backend, backend=backend,
                         options=options, config=config, seed=args.seed, textures=textures, device=device,
                         category=args.category)
    LOG.info("stream: %s -> %s", json.dumps(summary), args.out)
    return 0
