"""``anorefiner pgt`` and ``anorefiner run`` on the small demo dataset (tiny refiner settings)."""

import json

import numpy as np
import pandas as pd
import pytest

from anorefiner.cli import main as cli
from anorefiner.refine.store import read_refined

TINY = json.dumps({
    "ard": {"feat_channels": 16, "anomaly_channels": 8, "aa_channels": 12, "head_channels": 8},
    "pgt": {"group_size": 6, "n_pseudo_normal": 2, "n_anomalies_per_normal": 2, "epochs": 2, "batch_size": 2},
})


@pytest.fixture(scope="module")
def stores(demo_dataset, tmp_path_factory):
    """Feature cache and coarse store of demo 'widget' (EfficientNet-Lite0 random weights, 64 px)."""
    tmp = tmp_path_factory.mktemp("pgtcmd")
    feats, coarse = tmp / "f.h5", tmp / "c.h5"
    assert cli(["features", "--root", str(demo_dataset), "--dataset", "demo", "--category", "widget",
                "--backbone", "efficientnet_lite0", "--resolution", "64", "--pretrained", "none",
                "--device", "cpu", "--out", str(feats)]) == 0
    assert cli(["coarse", "--features", str(feats), "--backend-type", "musc", "--backend-name", "musc",
                "--options", json.dumps({"rscin": False}), "--dataset", "demo", "--category", "widget",
                "--device", "cpu", "--out", str(coarse)]) == 0
    return tmp, feats, coarse


def _pgt(demo_dataset, stores, out, seed=0, options=TINY):
    tmp, feats, coarse = stores
    return cli(["pgt", "--root", str(demo_dataset), "--dataset", "demo", "--category", "widget",
                "--features", str(feats), "--coarse", str(coarse), "--backbone", "efficientnet_lite0",
                "--resolution", "64", "--pretrained", "none", "--backend-type", "musc",
                "--backend-options", json.dumps({"rscin": False}), "--options", options, "--seed", str(seed),
                "--textures", "offline", "--eval-resolution", "32", "--device", "cpu", "--out", str(tmp / out)])


def test_pgt_command_is_deterministic_on_cpu(demo_dataset, stores):
    assert _pgt(demo_dataset, stores, "a.h5") == 0
    assert _pgt(demo_dataset, stores, "b.h5") == 0
    a, b = read_refined(stores[0] / "a.h5"), read_refined(stores[0] / "b.h5")
    assert a.attrs["category"] == "widget" and a.attrs["seed"] == 0
    for m in ("coarse", "ard", "combined"):
        assert a.maps[m].shape == (12, 32, 32)
        assert np.array_equal(a.maps[m], b.maps[m]) and np.array_equal(a.scores[m], b.scores[m])


def test_pgt_command_rejects_unknown_option(demo_dataset, stores):
    assert _pgt(demo_dataset, stores, "bad.h5", options=json.dumps({"pgt": {"epoch": 3}})) == 1
    assert not (stores[0] / "bad.h5").exists()


def test_run_command_writes_metrics(demo_dataset, tmp_path):
    out = tmp_path / "run"
    assert cli(["run", "--data-root", str(demo_dataset), "--category", "tiles", "--dataset", "demo",
                "--backbone", "efficientnet_lite0", "--resolution", "64", "--eval-resolution", "32",
                "--backend-options", json.dumps({"rscin": False}), "--options", TINY, "--no-pro",
                "--device", "cpu", "--out", str(out)]) == 0
    frame = pd.read_csv(out / "metrics.csv")
    assert list(frame.columns) == ["method", "metric", "value"]
    assert set(frame.method) == {"coarse", "ard", "combined"}
    assert {"pixel_ap", "pixel_f1_max", "image_auroc"} <= set(frame.metric)
    assert frame.value.between(0, 1).all()
    for name in ("features.h5", "coarse.h5", "refined.h5", "run.json"):
        assert (out / name).is_file()
