"""``anorefiner audit --compare A B``: two runs' rendered tables cell by cell, with the provenance that differs.

A and B are tables folders (every ``*.csv`` rendered there) or single rendered table CSVs. Cells are matched
on (table, dataset, row, column); a cell differs when its reproduced mean (as written, 4 decimals) or its
status differs. Each differing cell is listed with what differs in its row's provenance (weights, code); the
table-level differences (configuration hash, code of the rendering and of the stages, devices, package
versions) come first, since they explain whole tables at once (docs/audit.md).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .audit import _md, read_rendered
from .provenance import code_label, read_block, versions_line

KEY = ["table", "dataset", "row", "column"]
CORE = ["table", "dataset", "row", "column", "reproduced_mean", "status"]
DECIMALS = 4  # the rendered CSV's float format


def table_files(path) -> list[Path]:
    """The rendered tables of a folder (``*.csv`` with the rendered columns), or the one file given."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a tables folder nor a rendered table CSV")
    files = []
    for f in sorted(path.glob("*.csv")):
        header = f.open(encoding="utf-8").readline()
        if all(c in header.split(",") for c in CORE):
            files.append(f)
    if not files:
        raise ValueError(f"{path} holds no rendered table CSV (a file with columns {CORE})")
    return files


def _blocks(files) -> dict[str, dict]:
    out = {}
    for f in files:
        block = read_block(f)
        if block is not None:
            out[block["table"]] = block
    return out


def _changes(label: str, a, b) -> list[str]:
    return [] if a == b else [f"{label}: {a} → {b}"]


def block_differences(a: dict | None, b: dict | None) -> list[str]:
    """What differs between two tables' provenance blocks (``[]`` when nothing does)."""
    if a is None and b is None:
        return []
    if a is None or b is None:
        return [f"provenance block absent in {'A' if a is None else 'B'}"]
    out = _changes("rendered by", code_label(a["rendered_by"]["code"]), code_label(b["rendered_by"]["code"]))
    out += _changes("configuration sha256", a["config_sha256"], b["config_sha256"])
    out += _changes("code of the stages", "; ".join(a["stage_code"]), "; ".join(b["stage_code"]))
    for stage in sorted(set(a["devices"]) | set(b["devices"])):
        out += _changes(f"{stage} devices", ", ".join(a["devices"].get(stage, [])),
                        ", ".join(b["devices"].get(stage, [])))
    va, vb = versions_line(a["versions"]).split(", "), versions_line(b["versions"]).split(", ")
    if va != vb:
        out.append("packages: " + ", ".join(sorted(set(va) - set(vb))) + " → " + ", ".join(sorted(set(vb) - set(va))))
    return out


def _same(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return x == y


def compare_frames(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Outer join on the cell key; ``changed`` marks differing cells, ``row_provenance`` their rows' changes."""
    merged = a.merge(b, on=KEY, how="outer", suffixes=("_a", "_b"), indicator=True)
    lines = []
    for r in merged.to_dict("records"):
        ma, mb = (round(r[f"reproduced_mean_{s}"], DECIMALS) for s in "ab")
        prov = []
        if r["_merge"] == "both":
            prov += _changes("weights", r["weights_a"], r["weights_b"])
            prov += _changes("code", r["code_a"], r["code_b"])
        lines.append(dict(
            **{k: r[k] for k in KEY}, a=ma, b=mb, delta=mb - ma,
            status_a=r["status_a"] if r["_merge"] != "right_only" else "(absent)",
            status_b=r["status_b"] if r["_merge"] != "left_only" else "(absent)",
            changed=r["_merge"] != "both" or not _same(ma, mb) or r["status_a"] != r["status_b"],
            row_provenance="; ".join(prov)))
    return pd.DataFrame(lines, columns=KEY + ["a", "b", "delta", "status_a", "status_b", "changed",
                                              "row_provenance"])


def _num(x) -> str:
    return "" if isinstance(x, float) and math.isnan(x) else f"{x:.2f}"


def compare_markdown(path_a, path_b) -> str:
    files_a, files_b = table_files(path_a), table_files(path_b)
    a, b = read_rendered(files_a, required=CORE), read_rendered(files_b, required=CORE)
    cells = compare_frames(a, b)
    changed = cells[cells["changed"]]
    changed = changed.reindex(changed["delta"].abs().sort_values(ascending=False, na_position="last").index)
    blocks_a, blocks_b = _blocks(files_a), _blocks(files_b)
    out = ["# Comparison of two runs' tables", "", f"- A: {path_a}", f"- B: {path_b}", "",
           f"{len(changed)} of {len(cells)} cells differ (reproduced mean to {DECIMALS} decimals, or status).", "",
           "## Provenance differences", ""]
    diffs = [(t, d) for t in sorted(set(a["table"]) | set(b["table"]))
             for d in block_differences(blocks_a.get(t), blocks_b.get(t))]
    out += [f"- {t}: {d}" for t, d in diffs] or ["None: same configuration, code, devices and packages."]
    out += ["", "## Cell differences", ""]
    if not len(changed):
        return "\n".join(out + ["None.", ""])
    out += ["| table | dataset | row | column | A | B | B − A | status A → B | row provenance A → B |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in changed.itertuples(index=False):
        status = r.status_a if r.status_a == r.status_b else f"{r.status_a} → {r.status_b}"
        delta = "" if math.isnan(r.delta) else f"{r.delta:+.2f}"
        out.append(f"| {r.table} | {r.dataset} | {_md(r.row)} | {r.column} | {_num(r.a)} | {_num(r.b)} | {delta} | "
                   f"{_md(status)} | {_md(r.row_provenance) or 'same'} |")
    return "\n".join(out + [""])
