"""The paper's claims are gains: "+ Ours" over its base row (Table 1: +5.1 AP-segm on MuSc*), and the TTA
rows over theirs. This module names each gain row's base (at render time, from the declaration and the
configuration) and compares the reproduced gain with the published one (in the audit; docs/audit.md).

Base of a row: a refined row (variant other than ``coarse``) gains over the coarse row of the same backend
(and category) in the same table — the maps the refiner started from, e.g. "MuSc/+ Ours" (musc_star,
default) over "MuSc*" (musc_star, coarse); a TTA row (backend of type ``tta``) over the coarse row of its
``base`` backend. Without configuration a row labelled ``X/+ Y`` falls back to row ``X``.

Reproduced gain per seed: the row's value of that seed minus the base's value of the same seed (a base run
with one seed only, e.g. the deterministic APRIL-GAN, is subtracted from every seed); then mean ± sample std
over seeds. Published gain: published(row) − published(base). Sign agreement: the number of seeds whose gain
has the published gain's sign.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .declare import TableDecl

REFINER, TTA = "refiner", "TTA"


def base_rows(decl: TableDecl, config: dict) -> dict[str, tuple[str, str]]:
    """``{row label: (base row label, kind)}`` of the table's gain rows (kind ``refiner`` or ``TTA``)."""
    backends = config.get("backends") or {}
    coarse = {(r.backend, r.category): r.label for r in decl.rows if r.implemented and r.variant == "coarse"}
    labels = {r.label for r in decl.rows}
    out = {}
    for r in decl.rows:
        if not r.implemented:
            continue
        cfg = backends.get(r.backend) or {}
        if r.variant != "coarse":
            base, kind = coarse.get((r.backend, r.category)), REFINER
        elif cfg.get("type") == "tta":
            base, kind = coarse.get((cfg.get("base"), r.category)), TTA
        else:
            base, kind = None, None
        parent, _, last = r.label.rpartition("/")
        if base is None and last.startswith("+") and parent in labels:
            base, kind = parent, kind or (REFINER if "Ours" in last else TTA)
        if base and base != r.label:
            out[r.label] = (base, kind)
    return out


def format_seed_values(values: dict[int, float]) -> str:
    """``{seed: value}`` -> ``"0:97.1234;1:97.5000"`` (the rendered CSV's ``seed_values`` column)."""
    return ";".join(f"{s}:{v:.4f}" for s, v in sorted(values.items()))


def parse_seed_values(text) -> dict[int, float]:
    if not isinstance(text, str) or not text.strip():
        return {}
    try:
        return {int(s): float(v) for s, v in (part.split(":") for part in text.split(";"))}
    except ValueError as err:
        raise ValueError(f"seed_values {text!r} is not 'seed:value;...' ({err})") from None


def seed_gains(row: dict[int, float], base: dict[int, float]) -> dict[int, float]:
    if len(base) == 1:
        only = next(iter(base.values()))
        return {s: v - only for s, v in row.items()}
    return {s: v - base[s] for s, v in row.items() if s in base}


def gains_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """One line per (table, dataset, gain row, column): reproduced gain mean/std/n, published gain, agreement."""
    lines = []
    cells = {(r.table, r.dataset, r.row, r.column): r for r in frame.itertuples(index=False)}
    for r in frame.itertuples(index=False):
        base_label = getattr(r, "base_row", "")
        if not isinstance(base_label, str) or not base_label:
            continue
        base = cells.get((r.table, r.dataset, base_label, r.column))
        pub = (r.published - base.published) if base is not None else math.nan
        gains = seed_gains(parse_seed_values(r.seed_values), parse_seed_values(base.seed_values)) if base else {}
        g = np.array(list(gains.values()), dtype=float)
        line = dict(table=r.table, dataset=r.dataset, row=r.row, base=base_label, kind=r.gain_kind,
                    column=r.column, gain_mean=float(g.mean()) if len(g) else math.nan,
                    gain_std=float(g.std(ddof=1)) if len(g) > 1 else math.nan, n_seeds=len(g),
                    published_gain=pub, agree=math.nan)
        if len(g) and not math.isnan(pub) and pub != 0:
            line["agree"] = int((np.sign(g) == np.sign(pub)).sum())
        lines.append(line)
    return pd.DataFrame(lines, columns=["table", "dataset", "row", "base", "kind", "column", "gain_mean",
                                        "gain_std", "n_seeds", "published_gain", "agree"])


def _fmt(mean, std) -> str:
    if math.isnan(mean):
        return "not run"
    return f"{mean:+.2f}" + ("" if math.isnan(std) else f" ± {std:.2f}")


def verdict(table: str, sub: pd.DataFrame) -> str:
    """One line: how many cells reproduce the published gain's sign in every seed, and how far off they are."""
    ran = sub[sub["n_seeds"] > 0]
    if not len(ran):
        return f"{table}: none of its {sub['row'].nunique()} gain row(s) ran."
    parts = []
    for kind, k in ran.groupby("kind", sort=True):
        compared = k.dropna(subset=["agree"])
        if not len(compared):
            positive = int((k["gain_mean"] > 0).sum())
            parts.append(f"{kind}: no published gain to compare; the reproduced gain is positive in {positive} of "
                         f"{len(k)} cells (mean {k['gain_mean'].mean():+.2f} pp)")
            continue
        all_seeds = int((compared["agree"] == compared["n_seeds"]).sum())
        off = (compared["gain_mean"] - compared["published_gain"]).abs().mean()
        parts.append(f"{kind}: the published gain's sign holds in every seed for {all_seeds} of {len(compared)} "
                     f"cells; mean |reproduced − published gain| {off:.2f} pp")
    return f"{table}: " + "; ".join(parts) + "."


def markdown_lines(frame: pd.DataFrame, md) -> list[str]:
    """The audit's ``## Gains`` section: per table a verdict line and the gain cells."""
    gains = gains_frame(frame)
    out = ["## Gains", "",
           "Reproduced gain of each \"+ Ours\" (refiner) and TTA row over its base row, mean ± std over seeds "
           "(pp), beside the published gain; sign agreement = seeds whose gain has the published sign "
           "(docs/audit.md).", ""]
    if not len(gains):
        return out + ["No table declares a gain row.", ""]
    for table, sub in gains.groupby("table", sort=False):
        out += [f"### {table}", "", f"Verdict: {verdict(table, sub)}", "",
                "| dataset | row | base | column | reproduced gain | published gain | sign agreement |",
                "|---|---|---|---|---|---|---|"]
        for r in sub.itertuples(index=False):
            pub = "" if math.isnan(r.published_gain) else f"{r.published_gain:+.1f}"
            agree = "" if math.isnan(r.agree) else f"{int(r.agree)}/{r.n_seeds}"
            out.append(f"| {r.dataset} | {md(r.row)} | {md(r.base)} | {r.column} | {_fmt(r.gain_mean, r.gain_std)} "
                       f"| {pub} | {agree} |")
        out.append("")
    return out
