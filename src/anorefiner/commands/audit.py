"""``anorefiner audit --compare A B``: what differs between two runs' tables, and the provenance that explains it."""

from __future__ import annotations

import argparse
import sys

NAME = "audit"
HELP = "compare two runs' tables (folders or table CSVs) cell by cell, with their provenance differences"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compare", nargs=2, required=True, metavar=("A", "B"),
                        help="two tables folders (e.g. runA/tables runB/tables) or two rendered table CSVs")
    parser.add_argument("--out", default=None, help="write the comparison (Markdown) here instead of stdout")


def main(args: argparse.Namespace) -> int:
    from ..io import write_text_atomic
    from ..log import LOG
    from ..tables.compare import compare_markdown

    text = compare_markdown(*args.compare)
    if args.out:
        write_text_atomic(args.out, text)
        LOG.info("wrote %s", args.out)
    else:
        sys.stdout.write(text)
    return 0
