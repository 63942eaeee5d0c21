"""``anorefiner coarse``: coarse anomaly maps of one category from its feature cache."""

from __future__ import annotations

import json
import time

NAME = "coarse"
HELP = "zero-shot coarse anomaly maps (MuSc, PA-CLIP or your own maps) -> coarse store"


def add_arguments(p) -> None:
    p.add_argument("--features", required=True, help="feature cache HDF5 (results/features/...h5)")
    p.add_argument("--backend-type", required=True, choices=["musc", "paclip", "byo"])
    p.add_argument("--backend-name", required=True, help="config name, e.g. musc, musc_star, musc_cnn, paclip, byo")
    p.add_argument("--options", default="{}", help="backend options as JSON (config backends.<name>.options)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", required=True, help="mvtec_ad, visa or demo (picks RsCIN's k_list)")
    p.add_argument("--category", required=True)
    p.add_argument("--byo-maps", default=None, help="maps file for --backend-type byo (docs/byo.md)")
    p.add_argument("--backbone", default=None, help="backbone name as in the cache attrs: PA-CLIP text tower, CLIP image embedding for RsCIN")
    p.add_argument("--resolution", type=int, default=None, help="PA-CLIP: backbone input resolution")
    p.add_argument("--activation", choices=["gelu", "quick_gelu"], default=None,
                   help="open_clip ViTs: the activation the cache must have been extracted with (checked "
                        "against its attrs) and the text tower is built with")
    p.add_argument("--data-root", default=None,
                   help="PA-CLIP: dataset root; gives CADA the images (else it augments the token grid)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", required=True, help="coarse store to write (results/coarse/.../seed<k>.h5)")


def main(args) -> int:
    from ..cache import read_features
    from ..config import ConfigError
    from ..log import LOG
    from ..seeding import seed_everything
    from ..zsad import PRESETS, get_backend
    from ..zsad.store import write_coarse

    try:
        options = json.loads(args.options or "{}")
    except json.JSONDecodeError as err:
        raise ConfigError(f"--options for backend {args.backend_name!r} is not valid JSON: {err}") from err
    if not isinstance(options, dict):
        raise ConfigError(f"--options for backend {args.backend_name!r} must be a JSON object")
    seed_everything(args.seed)
    feats = read_features(args.features, expect={"activation": args.activation} if args.activation else None)
    t = args.backend_type
    if t in ("musc", "paclip"):
        options.setdefault("device", args.device)
    if t == "musc":
        options.setdefault("dataset", args.dataset)
    elif t == "paclip":
        options.setdefault("category", args.category.replace("_", " "))
    elif t == "byo":
        if args.byo_maps:
            options["maps_path"] = args.byo_maps
        proxy = options.setdefault("musc", {})
        proxy.setdefault("dataset", args.dataset)
        proxy.setdefault("device", args.device)
    key = args.backend_name if PRESETS.get(args.backend_name, (None,))[0] == t else t
    backbone = images = None
    if t == "paclip" or (t == "musc" and args.backbone):
        backbone, images = _paclip_inputs(args, feats, LOG)
    backend = get_backend(key, options, backbone=backbone, seed=args.seed)
    if images is not None:
        backend.images = images
    start = time.perf_counter()
    result = backend.coarse(feats)
    seconds = time.perf_counter() - start
    attrs = {
        "backend": args.backend_name,
        "backend_type": t,
        "options": options,
        "seed": args.seed,
        "dataset": args.dataset,
        "category": args.category,
        "features": str(args.features),
        "features_identity": {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in feats.attrs.items()},
        "seconds": seconds,
    }
    if t == "paclip":
        attrs["paclip_info"] = json.dumps(backend.last_info)
    write_coarse(args.out, feats.ids, result.maps, result.scores, attrs)
    LOG.info("coarse %s/%s (%s): %d maps %s in %.1f s -> %s", args.dataset, args.category, args.backend_name,
             len(feats.ids), tuple(result.maps.shape[1:]), seconds, args.out)
    return 0


def _paclip_inputs(args, feats, log):
    """The backbone (text tower, CADA re-extraction) and an image source, when available."""
    backbone = images = None
    if args.backbone:
        from ..backbones import build_backbone

        resolution = args.resolution or int(feats.attrs.get("resolution", 0)) or None
        if resolution is None:
            raise ValueError("--backbone given without --resolution and the feature cache has no 'resolution' attr")
        device = "cuda" if args.device == "cuda" else "cpu"
        if args.device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        activation = args.activation or feats.attrs.get("activation")
        backbone = build_backbone(args.backbone, resolution=resolution, device=device, activation=activation)
    else:
        log.warning("PA-CLIP without --backbone: no text tower, no image-level augmentation")
    if args.data_root and backbone is not None:
        from ..data.index import index_category, load_image

        df = index_category(args.data_root, args.category, dataset=args.dataset, split="test")
        paths = dict(zip(df["image_id"], df["image_path"]))
        missing = [i for i in feats.ids if i not in paths]
        if missing:
            raise ValueError(f"--data-root {args.data_root}: no image for id(s) {missing[:5]}")

        def images(indices):
            return [load_image(paths[feats.ids[int(i)]]) for i in indices]

    return backbone, images
