"""``anorefiner index``: list a category's images and masks as a CSV (index order) and check it."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.index import check_category, index_dataset
from ..io import write_csv_atomic
from ..log import LOG

NAME = "index"
HELP = "index an MVTec-layout category (CSV in index order) and optionally check images and masks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, required=True, help="dataset root holding <category>/ folders")
    parser.add_argument("--dataset", default="mvtec_ad", help="dataset name written to the index (default mvtec_ad)")
    parser.add_argument("--category", nargs="+", default=None,
                        help="category name(s) (default: every category folder under --root)")
    parser.add_argument("--split", choices=("train", "test"), default=None, help="only this split (default both)")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV to write atomically (default: print a summary only)")
    parser.add_argument("--check", action="store_true",
                        help="read every anomalous image and its mask: readable, same size (fails otherwise)")


def main(args: argparse.Namespace) -> int:
    frame = index_dataset(args.root, args.category, dataset=args.dataset, split=args.split)
    if args.check:
        for category, part in frame.groupby("category", sort=False):
            summary = check_category(part)
            LOG.info("checked %s/%s: %s", args.dataset, category, summary)
    if args.out is not None:
        write_csv_atomic(args.out, frame)
        LOG.info("wrote %d rows to %s", len(frame), args.out)
    counts = frame.groupby(["category", "split", "defect"]).size()
    print(counts.to_string())
    return 0
