"""``anorefiner tta``: a zero-shot backend adapted at test time (TIPI, SAR or DeYO) -> coarse store."""

from __future__ import annotations

import json
import time

from . import add_pos_embed_argument

NAME = "tta"
HELP = "test-time adaptation (tipi, sar, deyo) of a zero-shot backend's CLIP tower, group by group -> coarse store"


def add_arguments(p) -> None:
    from ..tta import METHODS
    from ..zsad.registry import TTA_TYPES

    p.add_argument("--root", required=True, help="dataset root (MVTec layout)")
    p.add_argument("--dataset", required=True, help="mvtec_ad, visa or demo (picks RsCIN's k_list)")
    p.add_argument("--category", required=True, help="category folder under the dataset root")
    p.add_argument("--method", required=True, choices=list(METHODS), help="the test-time adaptation method")
    p.add_argument("--base-type", required=True, choices=list(TTA_TYPES), help="type of the adapted backend")
    p.add_argument("--base-name", required=True, help="config name of the adapted backend, e.g. musc_star")
    p.add_argument("--base-options", default="{}", help="the adapted backend's options as JSON")
    p.add_argument("--options", default="{}", help="TTA options as JSON (config tta + backends.<name>.options)")
    p.add_argument("--backbone", required=True, help="open_clip model name, e.g. ViT-L-14-336")
    p.add_argument("--resolution", type=int, required=True, help="backbone input resolution R")
    p.add_argument("--layers", nargs="*", default=None, help="1-indexed blocks the backend reads (default quarters)")
    p.add_argument("--pretrained", default="default",
                   help="'default' (OpenAI), a tag, a weights file or 'none' (random)")
    p.add_argument("--activation", default=None, choices=["gelu", "quick_gelu"],
                   help="open_clip ViTs: MLP activation (as the feature cache; default gelu)")
    add_pos_embed_argument(p)
    p.add_argument("--seed", type=int, default=0, help="run seed: groups, DeYO shuffles, TIPI starts")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--backend-name", default=None, help="name recorded in the store (default <base>_<method>)")
    p.add_argument("--out", required=True, help="coarse store to write (results/coarse/.../seed<k>.h5)")


def main(args) -> int:
    import numpy as np
    import torch

    from ..backbones import build_backbone, resolve_device
    from ..config import from_dict, json_object
    from ..data.index import index_category, load_image
    from ..log import LOG
    from ..seeding import seed_everything
    from ..tta import TTAConfig, adapt_category, build_tta_backend
    from ..zsad.groups import make_groups
    from ..provenance import run_record, weight_source
    from ..stages import backend_options, checkpoint_of
    from ..zsad.store import write_coarse

    options = json_object(args.options, "--options")
    config = from_dict(TTAConfig, options, "tta")
    config.validate()
    device = resolve_device(args.device if config.device == "auto" else config.device)
    # what the coarse stage fills in: MuSc's dataset (RsCIN k list), APRIL-GAN's class name, the device
    base_options = backend_options(args.base_type, json_object(args.base_options, "--base-options"),
                                   dataset=args.dataset, category=args.category, device=str(device))
    seed_everything(args.seed)
    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    backbone = build_backbone(args.backbone, args.resolution, layers=args.layers or None, pretrained=pretrained,
                              device=device, seed=args.seed, activation=args.activation, pos_embed=args.pos_embed)
    backend = build_tta_backend(args.base_type, args.base_name, base_options, backbone, config, args.seed, device)

    index = index_category(args.root, args.category, dataset=args.dataset, split="test")
    if len(index) < 2:
        raise ValueError(f"{args.root}/{args.category}: {len(index)} test image(s); TTA over groups needs >= 2")
    ids, paths = list(index["image_id"]), list(index["image_path"])
    # the base backend's groups (MuSc*: its group_size and order), else the paper's u = 30, shuffled
    group_size = config.group_size or base_options.get("group_size") or 30
    order = base_options.get("group_order", "shuffled")
    groups = make_groups(len(ids), group_size, seed=args.seed if order == "shuffled" else None)

    def load_group(idx):
        return backbone.preprocess([load_image(paths[int(i)]) for i in idx])

    start = time.perf_counter()
    maps, scores, logs = adapt_category(backend, args.method, groups, load_group, config, args.seed,
                                        nominal_batch=group_size)
    seconds = time.perf_counter() - start
    name = args.backend_name or f"{args.base_name}_{args.method}"
    attrs = {
        "backend": name,
        "backend_type": "tta",
        "tta_method": args.method,
        "base_backend": args.base_name,
        "base_type": args.base_type,
        "options": {"tta": options, "base": base_options},
        "seed": args.seed,
        "dataset": args.dataset,
        "category": args.category,
        "features": "",
        "features_identity": {k: (v if isinstance(v, (int, float, str)) else json.dumps(v, default=str))
                              for k, v in backbone.identity.items()},
        "groups": json.dumps([np.asarray(g).tolist() for g in groups]),
        "tta_log": json.dumps(logs, default=float),
        "seconds": seconds,
        "device": str(device),
        "peak_gpu_bytes": int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else 0,
        "run": run_record(device, {"tta": options, "base": base_options, "seed": args.seed}),
        "weights": weight_source(backbone.weights, checkpoint_of(base_options), backbone.name),
    }
    write_coarse(args.out, ids, maps, scores, attrs)
    kept = [g["kept_fraction"] for g in logs]
    LOG.info("tta %s on %s/%s (%s): %d maps %s in %.1f s, kept fraction %.3f-%.3f -> %s", args.method,
             args.dataset, args.category, args.base_name, len(ids), tuple(maps.shape[1:]), seconds,
             min(kept), max(kept), args.out)
    return 0
