"""``anorefiner`` command line: one subcommand per pipeline stage (the workflow rules call these).

Each subcommand lives in :mod:`anorefiner.commands` as a module defining ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .config import ConfigError
from .log import LOG, setup_logging

# Subcommand name -> module under anorefiner.commands (imported lazily: torch is slow to import).
COMMANDS = {
    "download": "download",
    "fetch-weights": "fetch_weights",
    "demo-data": "demo_data",
    "index": "index",
    "features": "features",
    "coarse": "coarse",
    "tta": "tta",
    "pgt": "pgt",
    "metrics": "metrics",
    "table": "table",
    "audit": "audit",
    "figures": "figures",
    "run": "run",
    "stream": "stream",
    "plan": "plan",
    "train-backend": "train_backend",
    "train-seas": "train_seas",
    "list": "list",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anorefiner", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"anorefiner {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(see anorefiner {name} --help)")
            continue
        module = importlib.import_module(f"anorefiner.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only=only if only else None) if only else _light_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    if not getattr(args, "command", None) or not hasattr(args, "_module"):
        parser.print_help()
        return 2
    try:
        _remove_stale_temps(getattr(args, "out", None))
        _check_cuda(getattr(args, "device", None))
        return int(args._module.main(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        LOG.error("%s", err)
        return 1


def _check_cuda(device) -> None:
    """``--device cuda``: fail before any work when this node's CUDA is unusable (the workflow passes it to
    every job that asked the scheduler for a GPU, so such a job never runs for days on the CPU)."""
    if isinstance(device, str) and device.startswith("cuda"):
        from .backbones import resolve_device

        resolve_device(device)


def _remove_stale_temps(out) -> None:
    """A killed job leaves its atomic writer's hidden temp file beside ``--out``: remove it when the
    command that writes ``--out`` starts again (``anorefiner run`` cleans the files in its folder)."""
    if out is None:
        return
    from pathlib import Path

    from .io import remove_stale_temps

    if not Path(out).is_dir():
        remove_stale_temps(out)


def _light_parser() -> argparse.ArgumentParser:
    """Top-level help without importing every subcommand's heavy dependencies."""
    parser = argparse.ArgumentParser(prog="anorefiner", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"anorefiner {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        sub.add_parser(name, help=_summary(name, module_name))
    return parser


def _summary(name: str, module_name: str) -> str:
    """A subcommand's one-line ``HELP`` (its module imports its heavy dependencies only in ``main``)."""
    try:
        return importlib.import_module(f"anorefiner.commands.{module_name}").HELP
    except (ImportError, AttributeError):
        return f"see 'anorefiner {name} --help'"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
