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
    # The workflow passes every option, empty when unset; empty means "not given". Precedence when
    # several are given: --root, then --archive, then --url (the config always holds a url).
    parser.add_argument("--url", default="", help="mirror URL serving the same archive (default: official URL)")
    parser.add_argument("--archive", default="", help="an archive you already have (verified, not moved); "
                                                      "takes precedence over --url")
    parser.add_argument("--root", default="", help="an already-extracted folder: validated (MVTec layout) or, "
                                                   "for VisA, converted into --dest; takes precedence over both")
    parser.add_argument("--sha256", default="", help="expected SHA-256 (default: the official archive's)")
    add_retry_arguments(parser)


def add_retry_arguments(parser: argparse.ArgumentParser) -> None:
    """--retries/--timeout/--backoff of the resuming downloader (also `anorefiner fetch-weights`)."""
    defaults = DownloadOptions()
    parser.add_argument("--retries", type=int, default=defaults.retries,
                        help=f"extra attempts after a failed request (default {defaults.retries})")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s,
                        help=f"seconds of network silence before a retry (default {defaults.timeout_s:g})")
    parser.add_argument("--backoff", type=float, default=defaults.backoff_s,
                        help=f"first wait between attempts in seconds, doubled each time (default {defaults.backoff_s:g})")


def retry_options(args: argparse.Namespace) -> DownloadOptions:
    if args.retries < 0:
        raise ValueError(f"--retries must be >= 0, got {args.retries}")
    return DownloadOptions(retries=args.retries, timeout_s=args.timeout, backoff_s=args.backoff)


def main(args: argparse.Namespace) -> int:
    dest = args.dest or Path("resources/datasets") / args.dataset
    downloads = args.downloads or Path("resources/downloads") / args.dataset
    options = retry_options(args)
    try:
        out = prepare_dataset(args.dataset, dest, downloads, url=args.url or None, sha256=args.sha256 or None,
                              archive=Path(args.archive) if args.archive else None,
                              root=Path(args.root) if args.root else None, options=options)
    except (AcquisitionError, FileExistsError) as err:
        LOG.error("%s", err)
        return 1
    LOG.info("dataset %s is ready at %s", args.dataset, out.resolve())
    return 0
