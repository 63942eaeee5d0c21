"""``anorefiner table``: render one declared paper table (CSV + Markdown) or the audit page."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..log import LOG

NAME = "table"
HELP = "render a paper table (published numbers beside ours) or, with --audit, tables/audit.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="declared table, e.g. table1 (config/tables/<name>.yaml)")
    parser.add_argument("--tables-dir", default="config/tables", help="folder of table declarations")
    parser.add_argument("--config-json", default="{}",
                        help="workflow config as a JSON string or a path to a JSON/YAML file "
                             "(uses datasets.*.categories, backends, variants, tables.*)")
    parser.add_argument("--metrics", nargs="*", default=None,
                        help="tidy metric CSVs to read (default: the table's required files that exist "
                             "under --metrics-root)")
    parser.add_argument("--metrics-root", default="results/metrics", help="folder of the tidy metric CSVs")
    parser.add_argument("--audit", action="store_true", help="summarise rendered tables instead")
    parser.add_argument("--config-sha256", default=None,
                        help="SHA-256 of the workflow's resolved configuration, recorded in the provenance block "
                             "(default: the hash of --config-json)")
    parser.add_argument("inputs", nargs="*",
                        help="with --audit: rendered tables/<name>.csv files; otherwise tidy metric CSVs "
                             "(same as --metrics)")
    parser.add_argument("--out", required=True, help="tables/<name>.csv (a .md is written beside it) "
                                                     "or, with --audit, tables/audit.md")


def read_config(text: str) -> dict:
    """A JSON string, or a path to a JSON or YAML file."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as err:
            raise ValueError(f"--config-json is not valid JSON: {err}") from err
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"--config-json: {text!r} is neither JSON nor an existing file")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(path.read_text()) or {}
    return json.loads(path.read_text())


def main(args: argparse.Namespace) -> int:
    from ..tables.declare import load_declaration, required_metric_files, table_settings

    config = read_config(args.config_json)
    tolerance = float(table_settings(config)["tolerance"])
    if args.audit:
        from ..tables.audit import write_audit

        out = write_audit(args.inputs, args.out, tolerance)
        LOG.info("wrote %s (%d tables)", out, len(args.inputs))
        return 0
    if not args.name:
        raise ValueError("anorefiner table: give --name (or --audit)")
    from ..tables.provenance import table_block
    from ..tables.render import RANDOM_WEIGHTS, load_metrics, render_table, status_kind, write_table

    decl = load_declaration(args.name, args.tables_dir)
    if args.metrics is None and not args.inputs:
        files = [f for f in required_metric_files(decl, config, args.metrics_root) if Path(f).is_file()]
    else:
        files = list(args.metrics or []) + list(args.inputs)
    frame = render_table(decl, config, load_metrics(files), args.metrics_root)
    block = table_block(decl.name, frame.attrs["provenance_rows"], config, args.config_sha256)
    csv_path, md_path = write_table(frame, decl, args.out, tolerance, block)
    counts = frame["status"].map(status_kind).value_counts().to_dict()
    if frame["note"].str.contains(RANDOM_WEIGHTS, regex=False).any():
        LOG.warning("%s: rows computed from a backbone with RANDOM weights are marked %r", csv_path, RANDOM_WEIGHTS)
    for row in block["rows"]:
        if row["flag"]:
            LOG.warning("%s: %s / %s: %s", csv_path, row["dataset"], row["row"], row["flag"])
    LOG.info("wrote %s and %s from %d metric files: %s", csv_path, md_path, len(files), counts)
    return 0
