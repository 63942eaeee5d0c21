"""``anorefiner tta`` on the small demo dataset with the tiny CLIP: a coarse store that metrics read,
the PGT groups, per-group logs, and nothing written on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anorefiner.cli import main as cli
from anorefiner.zsad.groups import make_groups
from anorefiner.zsad.store import read_coarse


def _args(root, tiny_clip, out, method="sar", **over):
    args = {"--root": str(root), "--dataset": "demo", "--category": "widget", "--method": method,
            "--base-type": "musc", "--base-name": "musc_star", "--base-options": json.dumps({"group_size": 6}),
            "--options": json.dumps({"micro_batch": 3}), "--backbone": tiny_clip, "--resolution": "56",
            "--pretrained": "none", "--seed": "1", "--device": "cpu", "--out": str(out)}
    args.update(over)
    return ["tta", *[v for kv in args.items() for v in kv]]


def test_writes_a_coarse_store_with_group_logs(demo_dataset, tiny_clip, tmp_path):
    out = tmp_path / "seed1.h5"
    assert cli(_args(demo_dataset, tiny_clip, out)) == 0
    store = read_coarse(out)
    assert len(store.ids) == 12 and store.maps.shape == (12, 4, 4) and np.isfinite(store.scores).all()
    assert store.ids == sorted(store.ids, key=lambda i: (i.split("/")[1], i))  # index order
    attrs = store.attrs
    assert attrs["backend"] == "musc_star_sar" and attrs["tta_method"] == "sar" and attrs["base_backend"] == "musc_star"
    assert json.loads(attrs["groups"]) == [g.tolist() for g in make_groups(12, 6, seed=1)]
    logs = json.loads(attrs["tta_log"])
    assert [g["group"] for g in logs] == [0, 1]
    assert all({"kept_fraction", "loss", "loss2", "ema", "reset"} <= set(g) for g in logs)
    # the metrics stage reads it like any coarse store
    csv = tmp_path / "m.csv"
    assert cli(["metrics", "--root", str(demo_dataset), "--dataset", "demo", "--category", "widget",
                "--backend", "musc_star_sar", "--variant", "coarse", "--seed", "1", "--source", str(out),
                "--out", str(csv)]) == 0
    assert csv.read_text().count("\n") == 8


def test_bad_options_name_the_key_and_write_nothing(demo_dataset, tiny_clip, tmp_path):
    out = tmp_path / "bad.h5"
    assert cli(_args(demo_dataset, tiny_clip, out, **{"--options": json.dumps({"micro_bach": 3})})) == 1
    assert cli(_args(demo_dataset, tiny_clip, out, **{"--options": "[1]"})) == 1
    assert cli(_args(demo_dataset, tiny_clip, out, **{"--base-options": json.dumps({"topmax": 1})})) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_cnn_backbone_is_refused(demo_dataset, tmp_path):
    out = tmp_path / "cnn.h5"
    with pytest.raises(SystemExit):  # argparse: the base type is checked, the backbone at build
        cli(_args(demo_dataset, "x", out, **{"--method": "tent"}))
    assert cli(_args(demo_dataset, "efficientnet_lite0", out, **{"--resolution": "64"})) == 1
    assert not out.exists()


def test_april_gan_base_gets_its_class_name_and_the_tta_group_size(demo_dataset, tiny_clip, tmp_path):
    import torch

    from anorefiner.zsad.april_gan.backend import CHECKPOINT_KEY, LinearAdapters

    ck = tmp_path / "adapters.pt"
    torch.save({CHECKPOINT_KEY: LinearAdapters(64, 32, 4).state_dict()}, ck)
    out = tmp_path / "ag.h5"
    base = json.dumps({"checkpoint": str(ck), "text_cache": str(tmp_path / "text")})
    assert cli(_args(demo_dataset, tiny_clip, out, method="tipi", **{
        "--base-type": "april_gan", "--base-name": "april_gan", "--base-options": base,
        "--options": json.dumps({"micro_batch": 4, "group_size": 6})})) == 0
    store = read_coarse(out)
    assert store.maps.shape == (12, 4, 4) and ((store.scores > 0) & (store.scores < 1)).all()
    assert json.loads(store.attrs["groups"]) == [g.tolist() for g in make_groups(12, 6, seed=1)]
    assert store.attrs["options"]["base"]["class_name"] == "widget"
    assert store.attrs["backend"] == "april_gan_tipi"
