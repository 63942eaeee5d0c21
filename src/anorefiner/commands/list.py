"""``anorefiner list backends|tables|rows``: what exists, read from the registry and the declarations.

* ``backends``: every backend type of :mod:`anorefiner.zsad.registry` with its paper, whether rule
  ``train_backend`` trains it and where its weights can come from, whether PGT refines it and rule ``tta``
  adapts it, and its names (the configured ``backends.<name>`` with ``--config``, else the presets);
* ``tables``: every declared table (``config/tables/<name>.yaml``), its Snakemake target and row counts;
* ``rows``: every declared row and its status: what it runs, or why it is not run (not implemented: the
  declaration's reason; not configured: the config key that is missing).

Nothing here is written by hand: a new backend, table or row shows up as soon as it is declared.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "list"
HELP = "list the backends (paper, training, weights), the table targets, or each table row's status"
WHAT = ("backends", "tables", "rows")
DEFAULT_CONFIG = "config/config.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=WHAT, help="backends, tables (Snakemake targets) or rows (one line per row)")
    p.add_argument("--config", default=None,
                   help=f"workflow config (YAML or JSON) whose backends, datasets and variants say what runs "
                        f"(default: {DEFAULT_CONFIG} when it exists)")
    p.add_argument("--tables-dir", default="config/tables", help="folder of the table declarations")
    p.add_argument("--table", nargs="*", default=None, help="rows: only these tables (default: all)")


def main(args: argparse.Namespace) -> int:
    config = _config(args.config)
    if args.what == "backends":
        lines = backend_lines(config)
    elif args.what == "tables":
        lines = table_lines(args.tables_dir, config)
    else:
        lines = row_lines(args.tables_dir, config, args.table)
    print("\n".join(lines))
    return 0


def _config(path: str | None) -> dict | None:
    from .table import read_config

    if path is None:
        path = DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None
    return read_config(path) if path else None


def columns(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart (the last one unpadded)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    return ["  ".join([str(c).ljust(w) for c, w in zip(r, widths)] + [str(r[-1])]).rstrip()
            for r in [header, *rows]]


def weight_sources(kind: str) -> str:
    """Where a backend type's weights can come from (config ``backends.<name>.weights``)."""
    from ..zsad.checkpoints import OFFICIAL
    from ..zsad.registry import BACKEND_TYPES

    if not BACKEND_TYPES[kind].trainer:
        return "backbone only" if kind != "byo" else "maps file (docs/byo.md)"
    official = OFFICIAL.get(kind, {})
    if BACKEND_TYPES[kind].train_scope != "auxiliary":  # few-shot: no official file has a published checksum
        return "trained per category (rule train_fewshot)"
    if not official:
        return "trained"
    checked = all(src.get("git_blob") for src in official.values())
    return "trained | official (" + ("git blob checked" if checked else "a file you download: backends.<name>.official") + ")"


def backend_lines(config: dict | None) -> list[str]:
    from ..zsad import preset_names
    from ..zsad.registry import BACKEND_TYPES

    backends = (config or {}).get("backends") or {}
    rows = []
    for kind, entry in BACKEND_TYPES.items():
        names = [n for n, c in backends.items() if (c or {}).get("type") == kind] if config else preset_names([kind])
        rows.append([kind, entry.paper, "yes" if entry.trainer else "no", weight_sources(kind),
                     "yes" if entry.refinable else "no", "yes" if entry.tta else "no", ", ".join(names) or "-"])
    header = ["type", "paper", "trains", "weights", "PGT", "TTA", "config names" if config else "presets"]
    lines = columns(header, rows)
    tta = [[n, c.get("method", "-"), c.get("base", "-")] for n, c in backends.items() if (c or {}).get("type") == "tta"]
    if tta:
        lines += ["", "test-time adaptation (config type tta, rule tta):", *columns(["name", "method", "base"], tta)]
    return lines


def _declarations(tables_dir: str, names: list[str] | None = None):
    from ..tables.declare import list_tables, load_declaration

    for name in names or list_tables(tables_dir):
        yield load_declaration(name, tables_dir)


def row_status(row, datasets: list[str], config: dict | None) -> str:
    """``runs: ...``, ``not implemented: <why>`` or, per paper dataset, why the config does not run it."""
    from ..tables.declare import row_ready

    if not row.implemented:
        return f"not implemented: {row.not_implemented}"
    seeds = row.seeds if isinstance(row.seeds, str) else ",".join(map(str, row.seeds))
    runs = f"runs: {row.backend}/{row.variant}, method {row.method}, seeds {seeds}"
    if row.category:
        runs += f", category {row.category}"
    if config is None:
        return runs
    skipped = {ds: why for ds in datasets for ok, why in [row_ready(row, ds, config)] if not ok}
    if not skipped:
        return runs
    if len(skipped) == len(datasets) and len(set(skipped.values())) == 1:
        return f"not configured: {next(iter(skipped.values()))}"
    ran = [ds for ds in datasets if ds not in skipped]
    return "; ".join([f"{runs} ({', '.join(ran)})" if ran else runs.replace("runs:", "would run:")]
                     + [f"not on {ds}: {why}" for ds, why in skipped.items()])


def table_lines(tables_dir: str, config: dict | None) -> list[str]:
    rows = []
    for decl in _declarations(tables_dir):
        statuses = [row_status(r, decl.datasets, config) for r in decl.rows]
        running = sum(s.startswith("runs:") for s in statuses)
        counts = f"{len(decl.rows)} rows: {running} run, {len(decl.rows) - running} not"
        rows.append([f"tables/{decl.name}.csv", decl.published or "-", ", ".join(decl.datasets), counts, decl.title])
    return columns(["target", "published", "datasets", "rows", "title"], rows)


def row_lines(tables_dir: str, config: dict | None, names: list[str] | None = None) -> list[str]:
    rows = [[decl.name, r.label, row_status(r, decl.datasets, config)]
            for decl in _declarations(tables_dir, names) for r in decl.rows]
    return columns(["table", "row", "status"], rows)
