"""The paper's path end to end on CPU: config/smoke_paper.yaml builds tables/table1.csv (slow: ~1 h on 2 cores).

ViT-L-14-336 at 518 (random weights: no model hub here), layers 6/12/18/24, MuSc and MuSc*, the paper-width
ARD, PGT, evaluation at 518 with PRO; only the data, epochs and seeds are shrunk (see the config).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pandas as pd
import pytest
import yaml

from .conftest import REPO, snakemake

CONFIG = REPO / "config" / "smoke_paper.yaml"


def check_smoke_outputs(workdir: Path) -> None:
    """Every stage's output has the paper's geometry, and the random weights are marked everywhere."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cats = cfg["datasets"]["demo"]["categories"]
    n = cfg["datasets"]["demo"]["generator"]["n_test"]
    for cat in cats:
        with h5py.File(workdir / f"results/features/demo/vit_l14_336_musc@518-bicubic_no_antialias/{cat}.h5") as f:
            assert sorted(f["layers"]) == ["12", "18", "24", "6"]
            assert all(f[f"layers/{k}"].shape == (n, 37, 37, 1024) for k in f["layers"])
            attrs = {k: json.loads(v) for k, v in f.attrs.items() if k != "n_done"}
        assert attrs["weights"].startswith("random") and attrs["activation"] == "gelu"
        assert attrs["pos_embed"].startswith("bicubic_no_antialias (24, 24)->(37, 37)")  # MuSc's official resize
        assert attrs["backbone"] == "ViT-L-14-336" and attrs["resolution"] == 518
        for backend in ("musc", "musc_star"):
            with h5py.File(workdir / f"results/coarse/demo/{backend}/{cat}/seed0.h5") as f:
                assert f["maps"].shape == (n, 37, 37)
                assert json.loads(f.attrs["features_identity"])["weights"].startswith("random")
        with h5py.File(workdir / f"results/refined/demo/musc_star/default/seed0/{cat}.h5") as f:
            assert f["maps/combined"].shape == (n, 518, 518)
            assert len(set(f["groups"][()].tolist())) == 2
            history = json.loads(f.attrs["loss_history"])
        assert len(history) == 1 and len(history[0]) == cfg["pgt"]["epochs"]  # group 1 trained, group 2 refined
        metrics = pd.read_csv(workdir / f"results/metrics/demo/musc_star/default/seed0/{cat}.csv")
        assert set(metrics["method"]) == {"coarse", "ard", "combined"} and "pixel_pro" in set(metrics["metric"])
    table = pd.read_csv(workdir / "tables/table1.csv")
    computed = table[table["n_seeds"] > 0]
    assert set(computed["row"]) == {"MuSc", "MuSc*", "MuSc/+ Ours"}
    assert computed["note"].str.contains("NOT MEANINGFUL").all()
    assert "**RANDOM backbone weights: NOT MEANINGFUL**" in (workdir / "tables/table1.md").read_text()


@pytest.mark.slow
def test_smoke_paper_builds_table1(tmp_path):
    snakemake(tmp_path, CONFIG, "tables/table1.csv", timeout=4 * 3600)
    check_smoke_outputs(tmp_path)
