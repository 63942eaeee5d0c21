"""The audit's gains section (base rows, per-seed gains, sign agreement, verdict) and ``anorefiner audit
--compare`` on hand-made rendered tables."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from anorefiner.cli import main as cli_main
from anorefiner.tables.audit import _md
from anorefiner.tables.compare import compare_markdown
from anorefiner.tables.declare import load_declaration
from anorefiner.tables.gains import base_rows, gains_frame, markdown_lines, parse_seed_values, seed_gains
from anorefiner.tables.provenance import table_block
from anorefiner.tables.render import load_metrics, render_table, write_table

from .test_provenance import CONFIG, render, scored_run
from .test_render import TABLES_DIR

TABLE1_CONFIG = {"backends": {"musc_star": {"type": "musc"}, "musc_star_tipi": {"type": "tta", "base": "musc_star"},
                              "april_gan": {"type": "april_gan"}}}


def test_base_rows_follow_the_refiners_input_and_the_tta_base():
    bases = base_rows(load_declaration("table1", TABLES_DIR), TABLE1_CONFIG)
    assert bases["MuSc/+ Ours"] == ("MuSc*", "refiner")  # the paper's +5.1 AP-segm: 66.3 - 61.2 (MuSc*)
    assert bases["MuSc/+ TIPI"] == ("MuSc*", "TTA")
    assert bases["APRIL-GAN/+ Ours"] == ("APRIL-GAN", "refiner")
    assert "MuSc*" not in bases and "MuSc" not in bases
    # without the configuration a "X/+ Y" row falls back to row X
    assert base_rows(load_declaration("table1", TABLES_DIR), {})["APRIL-GAN/+ SAR"] == ("APRIL-GAN", "TTA")
    per_category = base_rows(load_declaration("table14", TABLES_DIR), {})
    assert per_category["MuSc+Ours/bottle"] == ("MuSc*/bottle", "refiner")


def test_seed_gains_pair_seeds_and_broadcast_a_single_seed_base():
    assert seed_gains({0: 3.0, 1: 5.0}, {0: 1.0, 1: 2.0}) == {0: 2.0, 1: 3.0}
    assert seed_gains({0: 3.0, 1: 5.0}, {0: 1.0}) == {0: 2.0, 1: 4.0}
    assert parse_seed_values("0:1.5000;2:3.2500") == {0: 1.5, 2: 3.25}
    with pytest.raises(ValueError, match="seed_values"):
        parse_seed_values("0=1")


def cell(row, base, seeds, published, column="AP-segm", kind="refiner"):
    values = ";".join(f"{s}:{v}" for s, v in seeds.items())
    return dict(table="table1", dataset="MVTec AD", row=row, column=column, base_row=base, gain_kind=kind,
                seed_values=values, published=published)


def test_gains_frame_against_hand_computed_values():
    frame = pd.DataFrame([
        cell("MuSc*", "", {0: 60.0, 1: 62.0}, 61.2),
        cell("MuSc/+ Ours", "MuSc*", {0: 65.0, 1: 61.0}, 66.3),  # gains +5, -1: mean 2, std 4.2426
        cell("MuSc/+ TIPI", "MuSc*", {}, 62.4, kind="TTA"),  # not run
    ])
    g = gains_frame(frame).set_index("row")
    ours = g.loc["MuSc/+ Ours"]
    assert ours["gain_mean"] == pytest.approx(2.0) and ours["gain_std"] == pytest.approx(math.sqrt(18))
    assert ours["published_gain"] == pytest.approx(5.1) and ours["agree"] == 1 and ours["n_seeds"] == 2
    assert g.loc["MuSc/+ TIPI", "n_seeds"] == 0 and math.isnan(g.loc["MuSc/+ TIPI", "agree"])
    text = "\n".join(markdown_lines(frame, _md))
    assert "| MVTec AD | MuSc/+ Ours | MuSc\\* | AP-segm | +2.00 ± 4.24 | +5.1 | 1/2 |" in text
    assert "| MuSc/+ TIPI | MuSc\\* | AP-segm | not run | +1.2 |  |" in text
    assert ("Verdict: table1: refiner: the published gain's sign holds in every seed for 0 of 1 cells; "
            "mean |reproduced − published gain| 3.10 pp.") in text


def test_demo_table_gain_without_published_numbers(tmp_path):
    for seed in (0, 1):
        for cat in ("tiles", "widget"):
            scored_run(tmp_path, "musc_star", seed, cat, 0.80)
            scored_run(tmp_path, "musc_star", seed, cat, 0.85, variant="default")
    _, frame = render(tmp_path)
    assert frame[frame["row"] == "MuSc/+ Ours"]["base_row"].unique().tolist() == ["MuSc*"]
    text = "\n".join(markdown_lines(frame, _md))
    assert "refiner: no published gain to compare; the reproduced gain is positive in 6 of 6 cells (mean +5.00 pp)" in text


def write_tables(folder, root, config=CONFIG, config_sha256="1" * 64):
    decl = load_declaration("demo_table1", TABLES_DIR)
    frame = render_table(decl, config, load_metrics(sorted((root / "metrics").rglob("*.csv"))),
                         str(root / "metrics"))
    write_table(frame, decl, folder / "demo_table1.csv", 1.0,
                table_block(decl.name, frame.attrs["provenance_rows"], config, config_sha256))


def test_compare_lists_changed_cells_with_their_provenance(tmp_path, capsys):
    for cat in ("tiles", "widget"):
        scored_run(tmp_path / "a", "musc", 0, cat, 0.90, commit="a" * 40)
        scored_run(tmp_path / "b", "musc", 0, cat, 0.90 if cat == "tiles" else 0.80, commit="b" * 40)
    write_tables(tmp_path / "A", tmp_path / "a")
    write_tables(tmp_path / "B", tmp_path / "b", config_sha256="2" * 64)
    text = compare_markdown(tmp_path / "A", tmp_path / "B")
    assert "6 of 24 cells differ" in text
    assert f"- demo_table1: configuration sha256: {'1' * 64} → {'2' * 64}" in text
    assert f"- demo_table1: code of the stages: {'a' * 40} → {'b' * 40}" in text
    assert f"| demo_table1 | MVTec AD | MuSc | AUROC-cls | 90.00 | 85.00 | -5.00 | no published value | code: " \
           f"{'a' * 40} → {'b' * 40} |" in text
    assert cli_main(["audit", "--compare", str(tmp_path / "A"), str(tmp_path / "A" / "demo_table1.csv")]) == 0
    same = capsys.readouterr().out
    assert "0 of 24 cells differ" in same and "None: same configuration" in same
    assert cli_main(["audit", "--compare", str(tmp_path / "A"), str(tmp_path / "nope")]) == 1
