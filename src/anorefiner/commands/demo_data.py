"""``anorefiner demo-data``: write the seeded offline demo dataset (MVTec layout, exact masks)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.demo import DEFAULT_CATEGORIES, GENERATORS, generate_demo
from ..log import LOG

NAME = "demo-data"
HELP = "generate the offline demo dataset (textures + one object, synthetic defects with exact masks)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("resources/datasets/demo"),
                        help="dataset folder to create (default resources/datasets/demo)")
    parser.add_argument("--categories", nargs="+", default=list(DEFAULT_CATEGORIES), choices=sorted(GENERATORS),
                        metavar="NAME", help=f"categories to generate, from {', '.join(sorted(GENERATORS))} "
                                             f"(default {' '.join(DEFAULT_CATEGORIES)})")
    parser.add_argument("--image-size", type=int, default=256, help="square image side in pixels (default 256)")
    parser.add_argument("--n-train", type=int, default=20, help="normal training images per category (default 20)")
    parser.add_argument("--n-test", type=int, default=60,
                        help="test images per category; half of them carry defects (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed: same seed gives byte-identical files (default 0)")


def main(args: argparse.Namespace) -> int:
    out = generate_demo(args.out, categories=tuple(args.categories), image_size=args.image_size,
                        n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    LOG.info("demo dataset ready at %s", out.resolve())
    return 0
