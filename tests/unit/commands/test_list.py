"""`anorefiner list backends|tables|rows` (issue 28, item 3): generated from the registry and declarations."""

import json
import re
from pathlib import Path

import yaml

from anorefiner.cli import main
from anorefiner.tables.declare import list_tables, load_declaration
from anorefiner.zsad import PRESETS
from anorefiner.zsad.checkpoints import OFFICIAL
from anorefiner.zsad.registry import BACKEND_TYPES

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "config" / "config.yaml"
TABLES = REPO / "config" / "tables"


def _list(capsys, *argv) -> list[str]:
    assert main(["list", *argv]) == 0
    return capsys.readouterr().out.splitlines()


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_backends_without_config_lists_each_type_with_its_presets(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config/config.yaml here: the presets are listed
    lines = _list(capsys, "backends")
    assert _cells(lines[0]) == ["type", "paper", "trains", "weights", "PGT", "TTA", "presets"]
    rows = {cells[0]: cells for cells in map(_cells, lines[1:])}
    assert list(rows) == list(BACKEND_TYPES)
    for kind, entry in BACKEND_TYPES.items():
        _, paper, trains, weights, pgt, tta, names = rows[kind]
        assert paper == entry.paper and entry.paper
        assert trains == ("yes" if entry.trainer else "no")
        assert weights.startswith("trained") == bool(entry.trainer)
        assert weights.startswith("trained | official") == (kind in OFFICIAL)  # AA-CLIP, Bayes-PFL: trained only
        assert weights.startswith("trained per category") == (entry.train_scope != "auxiliary")
        assert (pgt, tta) == ("yes" if entry.refinable else "no", "yes" if entry.tta else "no")
        assert names.split(", ") == [n for n, (k, _) in PRESETS.items() if k == kind]
    assert "git blob checked" in rows["april_gan"][3] and "a file you download" in rows["vcp_clip"][3]
    assert rows["aa_clip"][3] == rows["bayes_pfl"][3] == "trained"


def test_backends_with_config_lists_its_names_and_the_tta_backends(capsys):
    config = yaml.safe_load(CONFIG.read_text())
    lines = _list(capsys, "backends", "--config", str(CONFIG))
    assert _cells(lines[0])[-1] == "config names"
    rows = {cells[0]: cells for cells in map(_cells, lines[1:len(BACKEND_TYPES) + 1])}
    for kind in BACKEND_TYPES:
        configured = [n for n, c in config["backends"].items() if c.get("type") == kind]
        assert rows[kind][-1] == (", ".join(configured) or "-"), kind
    tta = lines[lines.index("test-time adaptation (config type tta, rule tta):") + 2:]
    expected = [[n, c["method"], c["base"]] for n, c in config["backends"].items() if c.get("type") == "tta"]
    assert [_cells(line) for line in tta] == expected and expected


def test_rows_status_runs_not_implemented_or_not_configured(capsys, tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({
        "title": "T", "published": None, "datasets": ["MVTec AD", "VisA"], "columns": {"AUROC": "image_auroc"},
        "rows": [{"row": "A", "backend": "musc", "variant": "coarse", "seeds": "first"},
                 {"row": "B", "not_implemented": "needs a trained model"},
                 {"row": "C", "backend": "paclip", "variant": "default"},
                 {"row": "D/{category}", "backend": "musc", "variant": "default", "categories": ["bottle"]}]}))
    config = {"datasets": {"mvtec_ad": {"categories": ["bottle"]}, "visa": {"categories": ["candle"]}},
              "backends": {"musc": {"type": "musc"}}, "variants": {"default": {}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    lines = _list(capsys, "rows", "--tables-dir", str(tmp_path), "--config", str(tmp_path / "config.json"))
    status = {cells[1]: cells[2] for cells in map(_cells, lines[1:])}
    assert status == {
        "A": "runs: musc/coarse, method coarse, seeds first",
        "B": "not implemented: needs a trained model",
        "C": "not configured: backend 'paclip' is not in config backends",
        "D/bottle": "runs: musc/default, method combined, seeds all, category bottle (MVTec AD); "
                    "not on VisA: category 'bottle' is not in config datasets.visa.categories",
    }
    table = _cells(_list(capsys, "tables", "--tables-dir", str(tmp_path), "--config", str(tmp_path / "config.json"))[1])
    assert table == ["tables/t.csv", "-", "MVTec AD, VisA", "4 rows: 2 run, 2 not", "T"]


def test_every_declared_table_and_row_is_listed(capsys):
    names = list_tables(TABLES)
    targets = [_cells(line)[0] for line in _list(capsys, "tables", "--tables-dir", str(TABLES))[1:]]
    assert targets == [f"tables/{n}.csv" for n in names]
    lines = _list(capsys, "rows", "--tables-dir", str(TABLES), "--config", str(CONFIG))[1:]
    declared = [(n, r.label) for n in names for r in load_declaration(n, TABLES).rows]
    assert [tuple(_cells(line)[:2]) for line in lines] == declared
    table13 = {_cells(line)[1]: _cells(line)[2] for line in lines if line.startswith("table13 ")}
    assert table13["AA-CLIP"].startswith("runs: aa_clip/coarse") and table13["RareCLIP"].startswith("runs: rareclip/")
    assert table13["Bayes-PFL"] == "runs: bayes_pfl/coarse, method coarse, seeds all"


def test_unknown_table_names_the_declared_ones(capsys):
    assert main(["list", "rows", "--tables-dir", str(TABLES), "--table", "table99"]) == 1

