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


def test_bring_your_own_maps_are_refined_end_to_end(demo_dataset, stores, tmp_path):
    """Maps of 'another method' (NPZ, 48 px, shuffled order) -> byo coarse store -> PGT -> metrics."""
    from anorefiner.data.index import index_category, load_mask

    _, feats, _ = stores
    index = index_category(demo_dataset, "widget", dataset="demo", split="test")
    rng = np.random.default_rng(0)
    maps = []
    for mask_path in index["mask_path"]:  # a noisy blurred-truth detector stands in for the method
        truth = load_mask(mask_path).astype(np.float32) if mask_path else np.zeros((64, 64), np.float32)
        maps.append(truth[::4, ::4].repeat(3, 0).repeat(3, 1)[:48, :48] + rng.random((48, 48), np.float32))
    order = rng.permutation(len(index))
    byo = tmp_path / "widget_maps.npz"
    np.savez(byo, ids=index["image_id"].to_numpy(str)[order], maps=np.stack(maps)[order])

    coarse, refined, metrics = tmp_path / "c.h5", tmp_path / "r.h5", tmp_path / "m.csv"
    assert cli(["coarse", "--features", str(feats), "--backend-type", "byo", "--backend-name", "byo",
                "--byo-maps", str(byo), "--dataset", "demo", "--category", "widget", "--device", "cpu",
                "--out", str(coarse)]) == 0
    assert cli(["pgt", "--root", str(demo_dataset), "--dataset", "demo", "--category", "widget",
                "--features", str(feats), "--coarse", str(coarse), "--backbone", "efficientnet_lite0",
                "--resolution", "64", "--pretrained", "none", "--backend-type", "byo", "--backend-name", "byo",
                "--options", TINY, "--seed", "0", "--textures", "offline", "--eval-resolution", "32",
                "--device", "cpu", "--out", str(refined)]) == 0
    assert cli(["metrics", "--root", str(demo_dataset), "--dataset", "demo", "--category", "widget",
                "--backend", "byo", "--variant", "default", "--seed", "0", "--source", str(refined),
                "--options", json.dumps({"resolution": 32, "compute_pro": False}), "--out", str(metrics)]) == 0
    frame = pd.read_csv(metrics)
    assert set(frame["method"]) == {"coarse", "ard", "combined"}
    # The brought maps follow the truth: their pixel AUROC is far above chance.
    coarse_auroc = frame.query("method == 'coarse' and metric == 'pixel_auroc'")["value"].item()
    assert coarse_auroc > 0.8
    assert read_refined(refined).ids == list(index["image_id"])


def test_cpu_preset_is_valid_and_options_override_it():
    from anorefiner.commands.run import CPU_PRESET, _merge
    from anorefiner.config import from_dict
    from anorefiner.refine.pgt import RefinerOptions

    merged = _merge(CPU_PRESET, {"pgt": {"lr": 0.05}, "ard": {"bi": False}})
    options = from_dict(RefinerOptions, merged, "refiner")  # raises on a key RefinerOptions lacks
    options.validate()
    assert options.pgt.lr == 0.05 and options.ard.bi is False
    assert options.ard.feat_channels == CPU_PRESET["ard"]["feat_channels"]
    assert CPU_PRESET["pgt"]["lr"] == 0.01  # the preset itself is not modified by the merge
