"""AnoRefiner Table 13's comparison backends through the real workflow with the tiny random CLIP (issue 25):
AA-CLIP and Bayes-PFL are trained on an auxiliary dataset by rule train_backend (both stages, one epoch each),
score demo/widget, PGT refines Bayes-PFL's maps, and every row of a table is rendered."""

from __future__ import annotations

import json

import h5py
import pandas as pd
import pytest
import torch

from .conftest import snakemake, trained_backend_config

ROWS = [
    {"row": "AA-CLIP", "backend": "aa_clip", "variant": "coarse", "seeds": "first"},
    {"row": "Bayes-PFL", "backend": "bayes_pfl", "variant": "coarse"},
    {"row": "Bayes-PFL/+ Ours", "backend": "bayes_pfl", "variant": "default", "method": "combined"},
]


@pytest.fixture(scope="module")
def table13_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("table13_backends_workflow")
    backbones = {"tiny": {"name": "anorefiner-tiny-clip", "pretrained": None, "resolution": 56, "activation": "gelu"}}
    aux = {"demo": "mvtec_ad"}
    backends = {
        "aa_clip": {"type": "aa_clip", "backbone": "tiny", "options": {}, "auxiliary": aux,
                    "train": {"mvtec_ad": {"text_epochs": 1, "image_epochs": 1, "text_batch_size": 4,
                                           "max_images": 4}}},
        "bayes_pfl": {"type": "bayes_pfl", "backbone": "tiny", "options": {"sample_num": 2}, "auxiliary": aux,
                      "train": {"mvtec_ad": {"stage1_epochs": 1, "stage2_epochs": 1, "batch_size": 4,
                                             "max_images": 4, "mosaic_p": 0.4}}},
    }
    path = trained_backend_config(work, "Table 13 backends on the demo", ROWS, backbones, backends, n_aux_test=6)
    proc = snakemake(work, path, timeout=1500)
    return work, path, proc


def test_both_backends_are_trained_by_the_workflow(table13_run):
    work, _, _ = table13_run
    for name, epochs in (("aa_clip", ("aa_clip text epoch 1/1", "aa_clip image epoch 1/1")),
                         ("bayes_pfl", ("bayes_pfl epoch 1/2 (stage 1)", "bayes_pfl epoch 2/2 (stage 2)"))):
        obj = torch.load(work / f"results/checkpoints/{name}/trained_mvtec_ad.pt", map_location="cpu",
                         weights_only=True)
        assert obj["meta"]["auxiliary_dataset"] == "mvtec_ad", name
        log = (work / f"logs/train_backend/{name}/trained_mvtec_ad.log").read_text()
        assert all(e in log for e in epochs), (name, log[-2000:])


def test_every_row_is_computed_and_the_stores_say_how(table13_run):
    work, _, _ = table13_run
    table = pd.read_csv(work / "tables/demo_table1.csv")
    assert set(table["row"]) == {r["row"] for r in ROWS}
    assert set(table["status"]) == {"no published value"}, table[["row", "status", "note"]]
    assert table["reproduced_mean"].between(0, 100).all()
    with h5py.File(work / "results/coarse/demo/aa_clip/widget/seed0.h5") as f:
        info = json.loads(f.attrs["backend_info"])
        assert info["class_minmax"] and info["levels"] == [1, 2, 3, 4]
        assert f["maps"][:].min() >= 0 and f["maps"][:].max() <= 1
    with h5py.File(work / "results/coarse/demo/bayes_pfl/widget/seed0.h5") as f:
        info = json.loads(f.attrs["backend_info"])
        assert info["sample_num"] == 2 and info["stage"] == 2
    log = (work / "logs/pgt/demo/bayes_pfl/default/seed0/widget.log").read_text()
    assert "NOT REFINED" not in log, log[-2000:]
