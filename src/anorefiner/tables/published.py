"""Published numbers of the AnoRefiner and PA-CLIP papers, as versioned data.

``published/<paper>_table<N>.csv`` holds every numeric cell of one paper table with columns
``paper, table, dataset, row, column, value, gain``: ``row`` is the paper's row label path
(e.g. ``"MuSc/+ Ours"``, ``"MuSc/r/3"``), ``column`` the paper's column label (tuples such as
"(F1-max, AP)" are split into ``"Pixel-level F1-max"`` and ``"Pixel-level AP"``), ``value`` in %,
``gain`` the "(+x)" printed next to the value (AnoRefiner Tables 1 and 13), empty otherwise.
A "-" cell of the paper is absent.
"""

from __future__ import annotations

from importlib import resources

import pandas as pd

COLUMNS = ["paper", "table", "dataset", "row", "column", "value", "gain"]


def published_names() -> list[str]:
    """Stems of every transcribed table, e.g. ``["anorefiner_table1", ..., "paclip_table6"]``."""
    folder = resources.files("anorefiner.tables") / "published"
    return sorted(p.name[: -len(".csv")] for p in folder.iterdir() if p.name.endswith(".csv"))


def load_published(name: str) -> pd.DataFrame:
    """Read ``published/<name>.csv`` (``name`` like ``"anorefiner_table6"``)."""
    path = resources.files("anorefiner.tables") / "published" / f"{name}.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"no published table {name!r} (known: {', '.join(published_names())})"
        )
    with path.open("r", encoding="utf-8") as fh:
        frame = pd.read_csv(fh, dtype={"row": str, "column": str, "dataset": str, "gain": str},
                            keep_default_na=False)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"published table {name}.csv lacks columns {missing}")
    frame["value"] = pd.to_numeric(frame["value"], errors="raise")
    frame["gain"] = pd.to_numeric(frame["gain"].replace("", None), errors="raise")
    duplicated = frame.duplicated(["dataset", "row", "column"])
    if duplicated.any():
        first = frame[duplicated].iloc[0]
        raise ValueError(
            f"published table {name}.csv repeats cell ({first['dataset']}, {first['row']}, {first['column']})"
        )
    return frame


def published_lookup(name: str | None) -> dict[tuple[str, str, str], float]:
    """``{(dataset, row, column): value}`` for one table; empty for ``None`` (demo tables)."""
    if not name:
        return {}
    frame = load_published(name)
    return {
        (r.dataset, r.row, r.column): float(r.value)
        for r in frame.itertuples(index=False)
    }
