"""Logging and progress bars: say what is happening and where output went."""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

LOG = logging.getLogger("anorefiner")


def setup_logging(verbose: bool = False) -> None:
    if LOG.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.DEBUG if verbose else logging.INFO)


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr (shows in Snakemake logs; disabled when stderr is not a TTY and
    ``ANOREFINER_NO_PROGRESS`` is set)."""
    import os

    kwargs.setdefault("disable", bool(os.environ.get("ANOREFINER_NO_PROGRESS")))
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
