"""Table 5's "(c) SeaS" path through the real workflow, offline: a tiny random Stable Diffusion saved to disk is
``seas.weights``; rule train_seas fine-tunes it on the demo category's first third of each defect type's anomalous
test images, PGT of variant ``seas`` takes its pseudo-anomalies from it, and the metrics leave those images out."""

from __future__ import annotations

import json
import re

import h5py
import pandas as pd
import pytest
import yaml

from .conftest import REPO, snakemake, tiny_config


@pytest.fixture(scope="module")
def seas_run(tmp_path_factory):
    from anorefiner.seas.tiny import build_tiny_sd
    from anorefiner.seas.tiny import tiny_config as seas_options

    work = tmp_path_factory.mktemp("seas_workflow")
    sd = build_tiny_sd(work / "tiny_sd")
    tables = work / "tables"
    tables.mkdir()
    (tables / "demo_table1.yaml").write_text(yaml.safe_dump({
        "title": "Table 5 on the demo", "published": None, "datasets": ["MVTec AD"],
        "columns": {"Pixel-level AP": "pixel_ap", "Image-level AP": "image_ap"},
        "rows": [{"row": "MuSc/(a) Perlin&DTD", "backend": "musc_star", "variant": "default", "method": "combined"},
                 {"row": "MuSc/(c) SeaS", "backend": "musc_star", "variant": "seas", "method": "combined"}],
    }, sort_keys=False))
    cfg = tiny_config(tables)
    cfg["targets"] = ["tables/demo_table1.csv"]
    cfg["datasets"]["demo"]["categories"] = ["widget"]
    cfg["backends"] = {"musc_star": cfg["backends"]["musc_star"]}
    cfg["figures"] = {"runs": []}
    cfg["variants"] = {"default": {}, "seas": {"synthesis": {"method": "seas"}}}
    cfg["seas"] = {"weights": str(sd), "options": seas_options()}
    path = work / "seas.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = snakemake(work, path, timeout=900)
    return work, path, proc


def test_the_seas_row_runs_from_the_tiny_model_to_the_table(seas_run):
    work, _, _ = seas_run
    model = work / "results/seas/demo/widget"
    manifest = json.loads((model / "manifest.json").read_text())
    trained_on = manifest["training_set"]["anomaly_ids"]
    assert len(manifest["training_set"]["defect_types"]) == 4 and len(trained_on) == 4
    train_log = (work / "logs/train_seas/demo/widget.log").read_text()
    assert "seas demo/widget: 4 defect types, 4 anomaly images for training (excluded from scoring)" in train_log
    with h5py.File(work / "results/refined/demo/musc_star/seas/seed0/widget.h5", "r") as f:
        assert json.loads(f.attrs["excluded_from_scoring"]) == trained_on
        provenance = json.loads(f.attrs["provenance"])
        assert provenance["seas"]["trained_on"] == trained_on
        assert json.loads(f.attrs["options"])["synthesis"]["method"] == "seas"
    log = (work / "logs/metrics/demo/musc_star/seas/seed0/widget.log").read_text()
    assert "4 test image(s) left out of scoring" in log
    default_log = (work / "logs/metrics/demo/musc_star/default/seed0/widget.log").read_text()
    assert "left out of scoring" not in default_log  # rows (a), (b) score every image
    table = pd.read_csv(work / "tables/demo_table1.csv")
    assert set(table["row"]) == {"MuSc/(a) Perlin&DTD", "MuSc/(c) SeaS"}
    assert set(table["status"]) == {"no published value"}, table[["row", "status", "note"]]
    assert table["reproduced_mean"].between(0, 100).all()


def test_dry_run_schedules_training_before_pgt_and_nothing_else(seas_run):
    work, path, _ = seas_run
    proc = snakemake(work, path, "-n", "--forcerun", "train_seas")
    assert "train_seas" in proc.stdout and "pgt" in proc.stdout
    assert "sd_weights" not in proc.stdout  # a local folder is used as it is


def test_table5_on_the_cluster_trains_seas_on_gpus_and_fetches_its_weights_on_the_login_node():
    """The paper config's Table 5 with the SLURM profile (dry run): one train_seas job per category on a GPU
    partition with CUDA, the pinned Stable Diffusion fetched once by a local rule, PGT of the seas rows reading both."""
    from .test_cluster import _dry_run, _jobs, _partition

    text = _dry_run("--workflow-profile", "profiles/slurm", "--slurm-no-account", "tables/table5.csv")
    jobs = _jobs(text)
    train = [j for j in jobs if j["rule"] == "train_seas"]
    assert len(train) == 15 + 12
    for job in train:
        assert int(job["resources"]["gpu"]) == 1 and _partition(job) == "gpu" and "--device cuda" in job["shell"]
        assert job["shell"].startswith("HF_HUB_OFFLINE=1 ")
        assert "--weights resources/weights/stable-diffusion-v1-4/" in job["shell"]
    fetch = [j for j in jobs if j["rule"] == "sd_weights"]
    assert len(fetch) == 1 and "gpu" not in fetch[0]["resources"]
    localrules = re.search(r"^localrules:\n((?:    \w+,\n)+)", (REPO / "workflow" / "Snakefile").read_text(), re.M)
    assert "    sd_weights,\n" in localrules.group(1)  # runs on the login node
    seas_pgt = [j for j in jobs if j["rule"] == "pgt" and "--seas-model results/seas/" in j["shell"]]
    assert len(seas_pgt) == 2 * 27 * 5  # VCP-CLIP and MuSc*, 27 categories, 5 seeds
