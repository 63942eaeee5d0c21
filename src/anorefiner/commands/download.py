"""``anorefiner download``: fetch, verify and extract one dataset (VisA converted to MVTec layout)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.download import AcquisitionError, DownloadOptions, prepare_dataset
from ..data.sources import SOURCES
from ..log import LOG

NAME = "download"
HELP = "download (resumable), verify SHA-256 and safely extract MVTec AD, VisA or DTD"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=sorted(SOURCES), help="which dataset")
    parser.add_argument("--dest", type=Path, default=None,
                        help="dataset folder to create (default resources/datasets/<dataset>)")
    parser.add_argument("--downloads", type=Path, default=None,
                        help="folder for the archive (default resources/downloads/<dataset>); "
                             "a hand-downloaded archive placed here under its official name is used")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--url", default=None, help="mirror URL serving the same archive (default: official URL)")
    source.add_argument("--archive", type=Path, default=None, help="an archive you already have (verified, not moved)")
    source.add_argument("--root", type=Path, default=None,
                        help="an already-extracted folder: validated (MVTec layout) or, for VisA, converted into --dest")
    parser.add_argument("--sha256", default=None, help="expected SHA-256 (default: the official archive's)")
    defaults = DownloadOptions()
    parser.add_argument("--retries", type=int, default=defaults.retries,
                        help=f"extra attempts after a failed request (default {defaults.retries})")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s,
                        help=f"seconds of network silence before a retry (default {defaults.timeout_s:g})")
    parser.add_argument("--backoff", type=float, default=defaults.backoff_s,
                        help=f"first wait between attempts in seconds, doubled each time (default {defaults.backoff_s:g})")


def main(args: argparse.Namespace) -> int:
    dest = args.dest or Path("resources/datasets") / args.dataset
    downloads = args.downloads or Path("resources/downloads") / args.dataset
    if args.retries < 0:
        raise ValueError(f"--retries must be >= 0, got {args.retries}")
    options = DownloadOptions(retries=args.retries, timeout_s=args.timeout, backoff_s=args.backoff)
    try:
        out = prepare_dataset(args.dataset, dest, downloads, url=args.url, sha256=args.sha256,
                              archive=args.archive, root=args.root, options=options)
    except AcquisitionError as err:
        LOG.error("%s", err)
        return 1
    LOG.info("dataset %s is ready at %s", args.dataset, out.resolve())
    return 0
