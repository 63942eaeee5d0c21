"""Render one declared table: reproduced mean ± std over seeds beside the published number.

Aggregation (the paper's protocol, Table 1 caption and supplement I): per run and category the
metric value of the tidy CSV; per seed the mean over the categories; then mean and sample std over
seeds, in % (the paper's unit). Each cell gets a status:

- ``reproduced``: |ours − published| ≤ ``REPRODUCED_PP`` (the paper prints one decimal),
- ``within tolerance``: |ours − published| ≤ ``tables.tolerance`` (percentage points),
- ``outside tolerance``: larger differences,
- ``no published value``: ours exists but the paper has no number ("-" cell, demo table),
- ``not run``: the row is implemented but metric values are missing (or the dataset, backend or
  variant is not configured; the ``note`` column says which),
- ``not implemented: <what>``: the row needs a method this project does not provide.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import atomic_path, write_json_atomic, write_text_atomic
from . import provenance as prov
from .declare import (
    RowDecl, TableDecl, dataset_key, metric_file, row_categories, row_ready, table_settings,
)
from .gains import base_rows, format_seed_values
from .published import published_lookup

TIDY_COLUMNS = ["dataset", "category", "backend", "method", "variant", "seed", "metric", "value"]
REPRODUCED_PP = 0.1  # the published values carry one decimal: closer than that is a reproduction
PAPER_CATEGORY_COUNTS = {"MVTec AD": 15, "VisA": 12}  # datasets.md
PAPER_DATASET_KEYS = {"MVTec AD": "mvtec_ad", "VisA": "visa"}  # config datasets holding the paper's categories
STATUS_ORDER = ["reproduced", "within tolerance", "outside tolerance", "no published value", "not run",
                "not implemented"]
OUT_COLUMNS = [
    "table", "dataset", "row", "column", "metric", "backend", "variant", "method",
    "reproduced_mean", "reproduced_std", "n_seeds", "published", "difference", "status", "note",
    # per-seed values (the audit's gains), the gain row's base (tables/gains.py), and the row's provenance
    # collected from its metric files' sidecars (tables/provenance.py, docs/audit.md)
    "seed_values", "base_row", "gain_kind", "weights", "code", "provenance_flag",
]
# Note on every value computed from a backbone with random weights (the workflow builds one when a backbone's
# `pretrained` is null/"none", e.g. the smoke run of config/smoke_paper.yaml, where no model hub is reachable).
RANDOM_WEIGHTS = "RANDOM backbone weights: NOT MEANINGFUL"


def random_weight_backends(config: dict) -> dict[str, str]:
    """``{backend: backbone}`` of the configured backends whose backbone has no pretrained weights.

    A missing or null ``pretrained`` (or ``"none"``) is what the features rule turns into random weights.
    """
    backbones = config.get("backbones") or {}
    out = {}
    for name, backend in (config.get("backends") or {}).items():
        key = (backend or {}).get("backbone")
        if key in backbones and str(backbones[key].get("pretrained") or "none").lower() == "none":
            out[name] = key
    return out


def load_metrics(paths) -> pd.DataFrame:
    """Concatenate tidy metric CSVs; check columns, value range [0, 1] and duplicates."""
    frames = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"metric file {path} does not exist")
        frame = pd.read_csv(path, dtype={"dataset": str, "category": str, "backend": str,
                                         "method": str, "variant": str, "metric": str})
        missing = [c for c in TIDY_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"metric file {path} lacks columns {missing} (has {list(frame.columns)})")
        bad = frame[~frame["value"].between(0.0, 1.0) & frame["value"].notna()]
        if len(bad):
            r = bad.iloc[0]
            raise ValueError(f"metric file {path}: {r['metric']} = {r['value']} is outside [0, 1] "
                             "(tidy metric values are fractions; tables convert to %)")
        frame["seed"] = frame["seed"].astype(int)
        frame["_file"] = str(path)
        frames.append(frame[TIDY_COLUMNS + ["_file"]])
    if not frames:
        return pd.DataFrame(columns=TIDY_COLUMNS + ["_file"])
    out = pd.concat(frames, ignore_index=True)
    key = ["dataset", "category", "backend", "method", "variant", "seed", "metric"]
    dup = out[out.duplicated(key, keep=False)]
    if len(dup):
        r = dup.iloc[0]
        files = sorted(set(dup[(dup[key] == r[key]).all(axis=1)]["_file"]))
        raise ValueError(f"metric value {tuple(r[key])} appears more than once (files: {files})")
    return out


def _index(metrics: pd.DataFrame) -> dict[tuple, float]:
    key = ["dataset", "backend", "variant", "seed", "category", "method", "metric"]
    return {tuple(k): float(v) for k, v in zip(metrics[key].itertuples(index=False, name=None), metrics["value"])}


def _files(metrics: pd.DataFrame) -> dict[tuple, str]:
    """(dataset, backend, variant, seed, category) -> the metric file holding that run's values."""
    key = ["dataset", "backend", "variant", "seed", "category"]
    return {tuple(k): f for k, f in zip(metrics[key].itertuples(index=False, name=None), metrics["_file"])}


def _status(mean: float, published: float | None, tolerance: float) -> tuple[str, float | None]:
    if published is None:
        return "no published value", None
    diff = mean - published
    if abs(diff) <= min(REPRODUCED_PP, tolerance) + 1e-9:
        return "reproduced", diff
    if abs(diff) <= tolerance + 1e-9:
        return "within tolerance", diff
    return "outside tolerance", diff


def render_table(decl: TableDecl, config: dict, metrics: pd.DataFrame,
                 metrics_root: str = "results/metrics") -> pd.DataFrame:
    """One output line per (dataset, row, column) of the declaration, in the paper's order.

    ``frame.attrs["provenance_rows"]``: the provenance of every row that ran (:func:`.provenance.row_provenance`).
    """
    settings = table_settings(config)
    tolerance = float(settings["tolerance"])
    published = published_lookup(decl.published)
    values, files = _index(metrics), _files(metrics)
    random_backends = random_weight_backends(config)
    bases = base_rows(decl, config)
    lines, prov_rows = [], []
    for paper_ds in decl.datasets:
        for row in decl.rows:
            ready, why = row_ready(row, paper_ds, config)
            base, kind = bases.get(row.label, ("", ""))
            row_prov = _row_provenance(row, paper_ds, config, files) if ready else None
            if row_prov is not None:
                prov_rows.append({"dataset": paper_ds, "row": row.label, **row_prov})
            for column, metric in decl.columns.items():
                pub = published.get((paper_ds, row.label, column))
                line = dict(table=decl.name, dataset=paper_ds, row=row.label, column=column, metric=metric,
                            backend=row.backend, variant=row.variant, method=row.method,
                            reproduced_mean=math.nan, reproduced_std=math.nan, n_seeds=0,
                            published=math.nan if pub is None else pub, difference=math.nan, note="",
                            seed_values="", base_row=base, gain_kind=kind, weights="", code="", provenance_flag="")
                if row_prov is not None:
                    line.update(weights=row_prov["weights"], code=row_prov["code"], provenance_flag=row_prov["flag"])
                if not row.implemented:
                    line.update(status=why, note="")
                elif not ready:
                    line.update(status="not run", note=why)
                else:
                    line.update(_cell(row, paper_ds, metric, pub, config, values, tolerance, metrics_root))
                    if row.backend in random_backends:
                        line["note"] = "; ".join(filter(None, [
                            f"{RANDOM_WEIGHTS} (backbones.{random_backends[row.backend]}.pretrained is null)",
                            line["note"]]))
                lines.append(line)
    frame = pd.DataFrame(lines, columns=OUT_COLUMNS)
    frame.attrs["provenance_rows"] = prov_rows
    return frame


def _row_provenance(row: RowDecl, paper_ds: str, config: dict, files: dict) -> dict | None:
    """Provenance of the metric files a row read (None when none of them exists)."""
    ds = dataset_key(paper_ds, config)
    used = [files[k] for seed in row.seed_list(config) for cat in row_categories(row, ds, config)
            if (k := (ds, row.backend, row.variant, seed, cat)) in files]
    return prov.row_provenance(used) if used else None


def _cell(row: RowDecl, paper_ds: str, metric: str, pub, config, values, tolerance, metrics_root) -> dict:
    ds = dataset_key(paper_ds, config)
    cats = row_categories(row, ds, config)
    seeds = row.seed_list(config)
    per_seed, missing, undefined = {}, [], []
    for seed in seeds:
        vals = []
        for cat in cats:
            v = values.get((ds, row.backend, row.variant, seed, cat, row.method, metric))
            where = metric_file(ds, row.backend, row.variant, seed, cat, metrics_root)
            if v is None:
                missing.append(where)
            elif math.isnan(v):  # e.g. a category without anomalous test images
                undefined.append(where)
            else:
                vals.append(v)
        if len(vals) == len(cats):
            per_seed[seed] = 100.0 * float(np.mean(vals))
    n = len(seeds) * len(cats)
    if missing:
        note = (f"missing {metric} ({row.method}) for {len(missing)} of {n} (seed, category) pairs, "
                f"e.g. {missing[0]}")
        return dict(status="not run", note=note)
    if undefined:
        note = f"{metric} ({row.method}) is undefined (NaN) for {len(undefined)} of {n}, e.g. {undefined[0]}"
        return dict(status="not run", note=note)
    mean = float(np.mean(list(per_seed.values())))
    std = float(np.std(list(per_seed.values()), ddof=1)) if len(per_seed) > 1 else math.nan
    status, diff = _status(mean, pub, tolerance)
    note = ""
    full = PAPER_CATEGORY_COUNTS.get(paper_ds)
    if row.category is None and full and ds != PAPER_DATASET_KEYS.get(paper_ds):
        note = f"mean over the {len(cats)} categories of dataset {ds!r}, not the paper's {paper_ds}"
    elif row.category is None and full and len(cats) < full:
        note = f"mean over {len(cats)} of the paper's {full} categories"
    return dict(reproduced_mean=mean, reproduced_std=std, n_seeds=len(per_seed), seed_values=format_seed_values(per_seed),
                difference=math.nan if diff is None else diff, status=status, note=note)


def status_kind(status: str) -> str:
    """Group a status for counting: ``not implemented: x`` -> ``not implemented``."""
    return "not implemented" if status.startswith("not implemented") else status


_MARK = {"reproduced": "✓", "within tolerance": "≈", "outside tolerance": "✗",
         "no published value": "", "not run": "not run", "not implemented": "n/i"}


def _fmt_cell(r) -> str:
    kind = status_kind(r.status)
    pub = "" if pd.isna(r.published) else f"{r.published:.1f}"
    if kind in ("not run", "not implemented"):
        return f"{_MARK[kind]}" + (f" ({pub})" if pub else "")
    ours = f"{r.reproduced_mean:.1f}"
    if not pd.isna(r.reproduced_std):
        ours += f" ± {r.reproduced_std:.1f}"
    if not pub:
        return ours
    return f"{ours} ({pub}, {r.difference:+.1f}) {_MARK[kind]}"


def _row_label(label: str, rows: pd.DataFrame) -> str:
    """The row label cell, marked when the row ran on random weights or its inputs mix provenances."""
    first = rows.iloc[0]
    marks = [f"⚠ {prov.RANDOM_WEIGHTS}"] if prov.is_random(first["weights"]) else []
    if prov.MIXED in str(first["provenance_flag"]):
        marks.append(f"⚠ {prov.MIXED}")
    return " ".join([label, *marks])


def to_markdown(frame: pd.DataFrame, decl: TableDecl, tolerance: float, block: dict | None = None) -> str:
    """Paper layout per dataset: one line per paper row, cells ``ours ± std (published, diff) mark``; then the
    notes and, with ``block`` (:func:`.provenance.table_block`), the provenance section."""
    out = [f"# {decl.title}", "",
           f"Cells: reproduced mean ± std over seeds (published, difference) in %. "
           f"✓ reproduced (|diff| ≤ {min(REPRODUCED_PP, tolerance):g}), ≈ within tolerance (≤ {tolerance:g}), "
           "✗ outside tolerance, n/i not implemented, not run = metric files missing.", ""]
    if frame["note"].str.contains(RANDOM_WEIGHTS, regex=False).any():
        out += [f"**{RANDOM_WEIGHTS}**: the rows marked in the notes were computed from a backbone with random "
                "weights (no pretrained weights configured or reachable). They test that the pipeline runs; "
                "their numbers say nothing about the method.", ""]
    counts = frame["status"].map(status_kind).value_counts()
    out.append("Status counts: " + ", ".join(f"{k}: {int(counts.get(k, 0))}" for k in STATUS_ORDER) + "")
    out.append("")
    columns = list(decl.columns)
    for ds in decl.datasets:
        sub = frame[frame["dataset"] == ds]
        out += [f"## {ds}", "", "| row | " + " | ".join(columns) + " |",
                "|---|" + "---|" * len(columns)]
        for label in dict.fromkeys(sub["row"]):
            rows = sub[sub["row"] == label]
            cells = {r.column: _fmt_cell(r) for r in rows.itertuples(index=False)}
            out.append(f"| {_md(_row_label(label, rows))} | " + " | ".join(_md(cells.get(c, "")) for c in columns)
                       + " |")
        out.append("")
    notes = frame[frame["status"].str.startswith("not implemented") | (frame["note"] != "")]
    notes = notes.drop_duplicates(["dataset", "row", "status", "note"])
    if len(notes):
        out += ["## Notes", ""]
        for r in notes.itertuples(index=False):
            text = r.note if r.note else r.status
            out.append(f"- {r.dataset} / {_md(r.row)}: {_md(text)}")
        out.append("")
    if block is not None:
        out += prov.markdown_lines([block], _md)
    return "\n".join(out)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("*", "\\*")


def write_table(frame: pd.DataFrame, decl: TableDecl, out_csv: str | Path, tolerance: float,
                block: dict | None = None) -> tuple[Path, Path]:
    """Write ``<out>.csv`` and ``<out>.md`` atomically, and with ``block`` ``<out>.provenance.json``."""
    out_csv = Path(out_csv)
    if block is not None:
        write_json_atomic(prov.block_path(out_csv), block)
    with atomic_path(out_csv, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False, float_format="%.4f")
    out_md = out_csv.with_suffix(".md")
    write_text_atomic(out_md, to_markdown(frame, decl, tolerance, block))
    return out_csv, out_md
