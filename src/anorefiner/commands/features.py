"""``anorefiner features``: extract one category's backbone features into the HDF5 cache."""

from __future__ import annotations

import argparse

from . import add_pos_embed_argument

NAME = "features"
HELP = "extract backbone patch tokens of a category's test images into an HDF5 feature cache"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="dataset root (MVTec layout: <root>/<category>/...)")
    parser.add_argument("--dataset", required=True, help="dataset name recorded in the index (mvtec_ad, visa, demo)")
    parser.add_argument("--category", required=True, help="category folder under the dataset root")
    parser.add_argument("--backbone", required=True,
                        help="ViT-L-14-336 (paper), any open_clip name, resnet50, efficientnet_lite0")
    parser.add_argument("--resolution", type=int, required=True,
                        help="input size R (R×R; ViTs: a multiple of the patch size)")
    parser.add_argument("--layers", nargs="*", default=None,
                        help="ViT: 1-indexed blocks (default quarters of the depth: 6 12 18 24 for ViT-L); "
                             "CNN: stage names (default layer2 layer3 / blocks.2 blocks.4)")
    parser.add_argument("--pretrained", default="default",
                        help="'default' (OpenAI / ImageNet; 'imagenet' for the CNNs), an official tag, a local weights "
                             "file, or 'none' (random, seed 0)")
    parser.add_argument("--activation", choices=["gelu", "quick_gelu"], default=None,
                        help="open_clip ViTs: MLP activation (default gelu, as the official MuSc/APRIL-GAN code "
                             "runs OpenAI weights at 518 px; recorded in the cache attrs)")
    add_pos_embed_argument(parser)
    from ..cache import COMPRESSIONS, DTYPES

    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass of the backbone")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16",
                        help="dtype the patch tokens are stored in (float16 halves the cache; class tokens stay float32)")
    parser.add_argument("--compression", choices=[c or "none" for c in COMPRESSIONS], default="none",
                        help="HDF5 compression of the cached tokens")
    parser.add_argument("--workers", type=int, default=1,
                        help="image-loading threads running ahead of the model (0: inline)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:i]")
    parser.add_argument("--out", required=True,
                        help="cache path, e.g. results/features/<dataset>/<backbone>@<R>/<category>.h5")


def main(args: argparse.Namespace) -> int:
    from .. import stages
    from ..backbones import build_backbone
    from ..data.index import index_category

    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    index = index_category(args.root, args.category, dataset=args.dataset)
    layers = args.layers or None  # "--layers" with no values (config without layers): the default
    backbone = build_backbone(args.backbone, args.resolution, layers=layers, pretrained=pretrained,
                              device=args.device, activation=args.activation, pos_embed=args.pos_embed)
    stages.features(index, backbone, args.out, batch_size=args.batch_size, dtype=args.dtype,
                    compression=args.compression, workers=args.workers)
    return 0
