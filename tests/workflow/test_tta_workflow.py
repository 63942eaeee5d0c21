"""A TTA baseline through the real workflow with the tiny random CLIP: rule tta writes a coarse store
(not rule coarse), metrics score it, and a table renders its row next to MuSc*."""

from __future__ import annotations

import json

import h5py
import pandas as pd
import yaml

from .conftest import snakemake, tiny_config


def test_sar_row_through_snakemake(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "demo_table1.yaml").write_text(yaml.safe_dump({
        "title": "TTA on the demo", "published": None, "datasets": ["MVTec AD"],
        "columns": {"AUROC-cls": "image_auroc", "AUROC-segm": "pixel_auroc"},
        "rows": [{"row": "MuSc*", "backend": "musc_star", "variant": "coarse"},
                 {"row": "MuSc/+ SAR", "backend": "musc_star_sar", "variant": "coarse"}],
    }, sort_keys=False))
    cfg = tiny_config(tables)
    cfg["targets"] = ["tables/demo_table1.csv"]
    cfg["datasets"]["demo"]["categories"] = ["tiles"]
    cfg["backbones"] = {"tiny": {"name": "anorefiner-tiny-clip", "pretrained": None, "resolution": 56}}
    cfg["backends"] = {
        "musc_star": {"type": "musc", "backbone": "tiny", "options": {"group_size": 6}},
        "musc_star_sar": {"type": "tta", "base": "musc_star", "method": "sar", "backbone": "tiny",
                          "options": {"sar": {"reset_threshold": 0.0}}},
    }
    cfg["tta"] = {"micro_batch": 3, "lr": 0.01}
    cfg["figures"] = {"runs": []}
    path = tmp_path / "tta.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    snakemake(tmp_path, path, timeout=300)

    store = tmp_path / "results/coarse/demo/musc_star_sar/tiles/seed0.h5"
    with h5py.File(store) as f:
        assert f["maps"].shape == (12, 4, 4)
        attrs = dict(f.attrs)
    assert attrs["tta_method"] == "sar" and attrs["base_backend"] == "musc_star"
    options = json.loads(attrs["options"])
    assert options["tta"]["micro_batch"] == 3 and options["tta"]["sar"] == {"reset_threshold": 0.0}
    assert options["base"]["group_size"] == 6
    logs = json.loads(attrs["tta_log"])
    assert len(logs) == 2 and all(g["stepped"] and 0 < g["kept_fraction"] <= 1 for g in logs)
    # the store came from rule tta (its log), not from rule coarse
    assert (tmp_path / "logs/tta/demo/musc_star_sar/tiles/seed0.log").is_file()
    assert not (tmp_path / "logs/coarse/demo/musc_star_sar").exists()
    assert (tmp_path / "results/benchmarks/tta/demo/musc_star_sar/tiles/seed0.tsv").is_file()
    table = pd.read_csv(tmp_path / "tables/demo_table1.csv")
    assert set(table["row"]) == {"MuSc*", "MuSc/+ SAR"}
    assert set(table["status"]) == {"no published value"}, table[["row", "status"]]
    assert table["reproduced_mean"].between(0, 100).all()
