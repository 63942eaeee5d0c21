"""Table declarations: every paper table declared, rows/columns matching the transcription, and the
metric files a table's target depends on."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from anorefiner.tables.declare import RunKey, list_tables, load_declaration, required_metric_files
from anorefiner.tables.published import load_published

TABLES_DIR = Path(__file__).resolve().parents[3] / "config" / "tables"
EXPECTED = sorted([f"table{i}" for i in range(1, 15)] + [f"paclip_table{i}" for i in range(1, 7)] + ["demo_table1"])
PAPER_BACKENDS = set(yaml.safe_load((TABLES_DIR.parent / "config.yaml").read_text())["backends"])
SMALL = {
    "datasets": {"mvtec_ad": {"categories": ["bottle", "cable"]}, "visa": {"categories": ["candle"]}},
    "tables": {"seeds": [0, 1], "tolerance": 1.0},
}


def test_every_table_is_declared():
    assert list_tables(TABLES_DIR) == EXPECTED


@pytest.mark.parametrize("name", [n for n in EXPECTED if n != "demo_table1"])
def test_declaration_matches_the_published_table(name):
    decl = load_declaration(name, TABLES_DIR)
    pub = load_published(decl.published)
    declared = {(ds, r.label) for ds in decl.datasets for r in decl.rows}
    published = set(zip(pub["dataset"], pub["row"]))
    assert published == declared, name  # no paper row dropped, no invented row
    assert set(pub["column"]) == set(decl.columns)
    for row in decl.rows:
        if row.implemented:
            assert row.backend in PAPER_BACKENDS, (name, row.label)  # a backend config/config.yaml defines
            assert row.method in {"coarse", "ard", "combined"}
        else:
            assert row.not_implemented


def test_demo_table_has_no_published_numbers():
    decl = load_declaration("demo_table1", TABLES_DIR)
    assert decl.published is None
    assert [r.label for r in decl.rows] == ["MuSc", "MuSc*", "MuSc/+ Ours", "PA-CLIP"]


def test_required_metric_files_table1():
    decl = load_declaration("table1", TABLES_DIR)
    files = required_metric_files(decl, SMALL)
    # deterministic backends: seed 0 only; the test-time-adaptation rows (type tta) are coarse stores
    runs = [("musc", "coarse", [0]), ("musc_star", "coarse", [0, 1]), ("musc_star", "default", [0, 1]),
            ("april_gan", "coarse", [0]), ("april_gan", "default", [0, 1]),
            ("vcp_clip", "coarse", [0]), ("vcp_clip", "default", [0, 1])]
    runs += [(f"{base}_{m}", "coarse", [0, 1]) for base in ("musc_star", "april_gan", "vcp_clip")
             for m in ("tipi", "sar", "deyo")]
    expected = [f"results/metrics/{ds}/{b}/{v}/seed{s}/{cat}.csv"
                for ds, cats in (("mvtec_ad", ["bottle", "cable"]), ("visa", ["candle"])) for cat in cats
                for b, v, seeds in runs for s in seeds]
    assert files == sorted(expected)
    assert set(decl.runs(SMALL)) == {RunKey(ds, b, v, s) for ds in ("mvtec_ad", "visa") for b, v, seeds in runs
                                     for s in seeds}


def test_required_files_follow_mapping_backends_variants_and_categories():
    config = {"datasets": {"demo": {"categories": ["tiles"]}}, "backends": {"musc_star": {}},
              "variants": {"default": {}, "sa": {}},
              "tables": {"seeds": [3], "datasets": {"MVTec AD": "demo"}}}
    assert required_metric_files(load_declaration("table1", TABLES_DIR), config) == [
        "results/metrics/demo/musc_star/coarse/seed3/tiles.csv",
        "results/metrics/demo/musc_star/default/seed3/tiles.csv",
    ]
    assert required_metric_files(load_declaration("table3", TABLES_DIR), config, "m") == [
        "m/demo/musc_star/default/seed3/tiles.csv", "m/demo/musc_star/sa/seed3/tiles.csv"]
    assert required_metric_files(load_declaration("table2", TABLES_DIR), config) == [
        "results/metrics/demo/musc_star/default/seed3/tiles.csv"]  # ard_none etc. are not configured
    # Table 14: only the configured category's rows (and the Mean row) need files
    t14 = load_declaration("table14", TABLES_DIR)
    assert len(t14.rows) == 32
    cfg14 = {"datasets": {"mvtec_ad": {"categories": ["bottle"]}}, "tables": {"seeds": [0]}}
    assert required_metric_files(t14, cfg14) == [
        "results/metrics/mvtec_ad/musc_star/coarse/seed0/bottle.csv",
        "results/metrics/mvtec_ad/musc_star/default/seed0/bottle.csv",
    ]
    # every implemented table needs something under the full default mapping
    for name in EXPECTED:
        decl = load_declaration(name, TABLES_DIR)
        if any(r.implemented for r in decl.rows):
            assert required_metric_files(decl, SMALL), name


@pytest.mark.parametrize("body, message", [
    ("rows: [{row: A, backend: musc, variant: coarse}]\ncolumns: {X: image_auc}\ndatasets: [VisA]\n", "image_auc"),
    ("rows: [{row: A, backend: musc}]\ncolumns: {X: image_ap}\ndatasets: [VisA]\n", "'variant'"),
    ("rows: [{row: A, backend: musc, variant: coarse, colour: red}]\ncolumns: {X: image_ap}\ndatasets: [VisA]\n", "colour"),
    ("rows: [{row: A, backend: musc, variant: coarse, method: ard}]\ncolumns: {X: image_ap}\ndatasets: [VisA]\n", "only method"),
    ("rows: [{row: A, not_implemented: x}, {row: A, not_implemented: y}]\ncolumns: {X: image_ap}\ndatasets: [VisA]\n", "twice"),
    ("columns: {X: image_ap}\ndatasets: [VisA]\n", "'rows'"),
])
def test_bad_declarations_are_named(tmp_path, body, message):
    (tmp_path / "bad.yaml").write_text(body)
    with pytest.raises(ValueError, match=message) as err:
        load_declaration("bad", tmp_path)
    assert "bad.yaml" in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_declaration("missing", tmp_path)
