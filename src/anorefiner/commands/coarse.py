"""``anorefiner coarse``: coarse anomaly maps of one category from its feature cache."""

from __future__ import annotations

from ..zsad import preset_names
from ..zsad.registry import BACKEND_TYPES

NAME = "coarse"
HELP = f"zero-shot coarse anomaly maps of one category ({', '.join(BACKEND_TYPES)}) -> coarse store"


def add_arguments(p) -> None:
    p.add_argument("--features", required=True, help="feature cache HDF5 (results/features/...h5)")
    p.add_argument("--backend-type", required=True, choices=list(BACKEND_TYPES),
                   help="backend type (config backends.<name>.type; 'anorefiner list backends')")
    p.add_argument("--backend-name", required=True,
                   help=f"config name (backends.<name>); a preset name keeps its preset: {', '.join(preset_names())}")
    p.add_argument("--options", default="{}", help="backend options as JSON (config backends.<name>.options)")
    p.add_argument("--seed", type=int, default=0, help="run seed (MuSc* groups, PA-CLIP augmentations)")
    p.add_argument("--dataset", required=True, help="mvtec_ad, visa or demo (picks RsCIN's k_list)")
    p.add_argument("--category", required=True, help="category folder under the dataset root")
    p.add_argument("--byo-maps", default=None, help="maps file for --backend-type byo (docs/byo.md)")
    p.add_argument("--backbone", default=None,
                   help="backbone name as in the cache attrs: PA-CLIP text tower, CLIP image embedding for RsCIN")
    p.add_argument("--resolution", type=int, default=None, help="backbone input resolution (default: the cache's)")
    p.add_argument("--pretrained", default="default",
                   help="backbone weights as for 'anorefiner features' ('none' = random)")
    p.add_argument("--activation", choices=["gelu", "quick_gelu"], default=None,
                   help="open_clip ViTs: the activation the cache must have been extracted with (checked "
                        "against its attrs) and the text tower is built with")
    p.add_argument("--data-root", default=None,
                   help="PA-CLIP: dataset root; gives CADA the images (else it augments the token grid)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--out", required=True, help="coarse store to write (results/coarse/.../seed<k>.h5)")


def main(args) -> int:
    from .. import stages
    from ..cache import read_attrs

    options = stages.backend_options(args.backend_type, args.options, dataset=args.dataset, category=args.category,
                                     device=args.device, byo_maps=args.byo_maps)
    backbone = None
    if args.backbone:
        backbone = stages.cache_backbone(read_attrs(args.features), args.backbone, args.resolution,
                                         args.pretrained, args.device, args.activation)
    elif args.activation:
        from ..cache import check_attrs

        check_attrs(read_attrs(args.features), {"activation": args.activation}, args.features)
    stages.coarse(args.features, args.backend_name, args.backend_type, options, seed=args.seed,
                  dataset=args.dataset, category=args.category, out=args.out, backbone=backbone,
                  data_root=args.data_root)
    return 0
