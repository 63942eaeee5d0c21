"""APRIL-GAN through the real workflow with the tiny random CLIP: train the adapters on an auxiliary
dataset (rule train_backend), score another, refine with PGT, render a table row."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from .conftest import snakemake, trained_backend_config


@pytest.fixture(scope="module")
def april_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("april_gan_workflow")
    rows = [{"row": "APRIL-GAN", "backend": "april_gan", "variant": "coarse", "seeds": "first"},
            {"row": "APRIL-GAN/+ Ours", "backend": "april_gan", "variant": "default", "method": "combined"}]
    backbones = {"tiny": {"name": "anorefiner-tiny-clip", "pretrained": None, "resolution": 112, "activation": "gelu"}}
    backends = {"april_gan": {
        "type": "april_gan", "backbone": "tiny", "options": {"batch_size": 6},
        "auxiliary": {"demo": "mvtec_ad"},
        "train": {"mvtec_ad": {"epochs": 1, "batch_size": 4, "mosaic_p": 0.2, "dim_out": 32}},
    }}
    path = trained_backend_config(work, "APRIL-GAN on the demo", rows, backbones, backends)
    proc = snakemake(work, path, timeout=600)
    return work, path, proc


def test_adapters_are_trained_then_used_for_a_table_row(april_run):
    work, _, proc = april_run
    ck = work / "results/checkpoints/april_gan/trained_mvtec_ad.pt"
    obj = torch.load(ck, map_location="cpu", weights_only=True)
    assert sorted(obj["trainable_linearlayer"])[:2] == ["fc.0.bias", "fc.0.weight"]
    assert len(obj["meta"]["epoch_losses"]) == 1 and obj["meta"]["classes"] == ["tiles"]
    log = (work / "logs/train_backend/april_gan/trained_mvtec_ad.log").read_text()
    assert "april_gan epoch 1/1: mean loss" in log
    assert list((work / "results/text/april_gan").glob("widget-*.npz"))
    table = pd.read_csv(work / "tables/demo_table1.csv")
    assert set(table["row"]) == {"APRIL-GAN", "APRIL-GAN/+ Ours"}
    # Every cell was computed (no published numbers for the demo): a value in [0, 100], never "not run".
    assert set(table["status"]) == {"no published value"}, table[["row", "status", "note"]]
    assert table["reproduced_mean"].between(0, 100).all()


def test_dry_run_lists_the_training_job(april_run):
    work, path, _ = april_run
    proc = snakemake(work, path, "-n", "--forcerun", "train_backend")
    assert "train_backend" in proc.stdout
