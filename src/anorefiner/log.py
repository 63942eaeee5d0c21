"""Logging and progress bars: say what is happening and where output went."""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

LOG = logging.getLogger("anorefiner")


def setup_logging(verbose: bool = False) -> None:
    """One stderr handler, on the root logger: the package's lines and those of dependencies that log through
    the root (open_clip's ``logging.warning``) share it. A handler of the package's own beside the root's,
    which ``logging.warning`` installs when the root has none, printed every package line twice."""
    root = logging.getLogger()
    LOG.setLevel(logging.DEBUG if verbose else logging.INFO)
    if any(getattr(h, "name", None) == "anorefiner" for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("anorefiner")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)  # the root's own level (WARNING) filters the dependencies; LOG's filters ours


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr (shows in Snakemake logs; disabled when stderr is not a TTY and
    ``ANOREFINER_NO_PROGRESS`` is set)."""
    import os

    kwargs.setdefault("disable", bool(os.environ.get("ANOREFINER_NO_PROGRESS")))
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
