"""``tables/audit.md``: one page summarising every rendered table (``tables/<name>.csv``).

Per table the number of cells in each status (see :mod:`anorefiner.tables.render`); the provenance of
every table and row (:mod:`.provenance`: commits, configuration hash, packages, devices, weights, flags);
the reproduced gains of the "+ Ours" and TTA rows beside the published ones (:mod:`.gains`); the cells with
the largest |reproduced − published| over all tables; what did not run and what is not implemented.
docs/audit.md describes the page.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..io import write_text_atomic
from . import gains, provenance
from .render import OUT_COLUMNS, STATUS_ORDER, status_kind

N_LARGEST = 15  # enough to see the pattern of the worst cells without drowning the page


TEXT_COLUMNS = ("row", "column", "note", "status", "seed_values", "base_row", "gain_kind", "weights", "code",
                "provenance_flag")


def read_rendered(paths, required=OUT_COLUMNS) -> pd.DataFrame:
    """Rendered table CSVs, concatenated; columns of ``required`` a file lacks are an error, other absent
    text columns (tables rendered by an older version, ``audit --compare``) are empty."""
    frames = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"rendered table {path} does not exist")
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=dict.fromkeys(TEXT_COLUMNS, str))
        missing = [c for c in required if c not in frame.columns]
        if missing:
            raise ValueError(f"{path} is not a rendered table: lacks columns {missing}")
        for col in TEXT_COLUMNS:
            frame[col] = frame[col].fillna("") if col in frame.columns else ""
        frames.append(frame)
    if not frames:
        raise ValueError("the audit needs at least one rendered table CSV")
    return pd.concat(frames, ignore_index=True)


def read_blocks(paths) -> list[dict]:
    """The provenance block beside each rendered table (``tables/<name>.provenance.json``); a missing one is
    an error: the audit must not present a table whose provenance it cannot show."""
    blocks = []
    for path in paths:
        block = provenance.read_block(path)
        if block is None:
            raise FileNotFoundError(f"{provenance.block_path(path)} does not exist: render {path} again "
                                    "(anorefiner table writes it)")
        blocks.append(block)
    return blocks


def audit_markdown(frame: pd.DataFrame, tolerance: float | None = None, blocks: list[dict] | None = None) -> str:
    frame = frame.copy()
    frame["kind"] = frame["status"].map(status_kind)
    out = ["# Reproduction audit", ""]
    if tolerance is not None:
        out += [f"Tolerance: {tolerance:g} percentage points.", ""]
    totals = frame["kind"].value_counts()
    compared = int(sum(totals.get(k, 0) for k in ("reproduced", "within tolerance", "outside tolerance")))
    ok = int(totals.get("reproduced", 0) + totals.get("within tolerance", 0))
    out += [f"{len(frame)} cells in {frame['table'].nunique()} table(s); {compared} compared with a published "
            f"number, {ok} of them within tolerance; {int(totals.get('not run', 0))} not run; "
            f"{int(totals.get('not implemented', 0))} not implemented.", ""]
    out += ["| table | " + " | ".join(STATUS_ORDER) + " | max abs diff |",
            "|---|" + "---|" * (len(STATUS_ORDER) + 1)]
    for table, sub in frame.groupby("table", sort=False):
        counts = sub["kind"].value_counts()
        diffs = sub["difference"].abs().dropna()
        worst = f"{diffs.max():.2f}" if len(diffs) else ""
        out.append(f"| {table} | " + " | ".join(str(int(counts.get(k, 0))) for k in STATUS_ORDER) + f" | {worst} |")
    out.append("")
    flagged = frame[frame["provenance_flag"] != ""].drop_duplicates(["table", "dataset", "row"])
    random = frame[frame["weights"].map(provenance.is_random)].drop_duplicates(["table", "dataset", "row"])
    if len(random):
        out += [f"**{len(random)} row(s) computed with {provenance.RANDOM_WEIGHTS}** (see Provenance).", ""]
    if len(flagged):
        out += [f"**{len(flagged)} row(s) flagged** for their provenance:", ""]
        out += [f"- {r.table} / {r.dataset} / {_md(r.row)}: {_md(r.provenance_flag)}" for r in flagged.itertuples()]
        out.append("")
    if blocks:
        out += provenance.markdown_lines(blocks, _md)
    out += gains.markdown_lines(frame, _md)
    diffs = frame.dropna(subset=["difference"])
    if len(diffs):
        worst = diffs.reindex(diffs["difference"].abs().sort_values(ascending=False).index).head(N_LARGEST)
        out += [f"## Largest differences (top {len(worst)})", "",
                "| table | dataset | row | column | ours | published | difference | status |",
                "|---|---|---|---|---|---|---|---|"]
        for r in worst.itertuples(index=False):
            out.append(f"| {r.table} | {r.dataset} | {_md(r.row)} | {r.column} | {r.reproduced_mean:.2f} | "
                       f"{r.published:.1f} | {r.difference:+.2f} | {r.status} |")
        out.append("")
    not_run = frame[frame["kind"] == "not run"]
    if len(not_run):
        out += ["## Not run", ""]
        for (table, ds, row), sub in not_run.groupby(["table", "dataset", "row"], sort=False):
            out.append(f"- {table} / {ds} / {_md(row)}: {_md(sub['note'].iloc[0])}")
        out.append("")
    ni = frame[frame["kind"] == "not implemented"]
    if len(ni):
        out += ["## Not implemented", ""]
        for status, sub in ni.groupby("status", sort=True):
            rows = ", ".join(f"{t}:{_md(r)}" for t, r in dict.fromkeys(zip(sub["table"], sub["row"])))
            out.append(f"- {_md(status[len('not implemented: '):])} — {len(sub)} cells ({rows})")
        out.append("")
    return "\n".join(out)


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("*", "\\*")


def write_audit(paths, out_path: str | Path, tolerance: float | None = None) -> Path:
    return write_text_atomic(out_path, audit_markdown(read_rendered(paths), tolerance, read_blocks(paths)))
