"""``anorefiner plan``: its jobs are Snakemake's own, and its cost model is the documented arithmetic."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from anorefiner.cli import main as cli_main
from anorefiner.commands.plan import CostModel, Job, load_rates, parse_jobs, rates_from_gpu_check

REPO = Path(__file__).resolve().parents[3]


def snakemake_counts(workdir: Path, *args: str) -> dict[str, int]:
    """Job counts of an independent ``snakemake -n --quiet rules`` run (its summary table only)."""
    cmd = [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--workflow-profile", "none", "--cores", "1",
           "--directory", str(workdir), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", proc.stdout + proc.stderr, re.M)}
    counts.pop("total", None)
    return counts


def plan_counts(tmp_path: Path, workdir: Path, *args: str) -> dict[str, int]:
    out = tmp_path / "plan.json"
    assert cli_main(["plan", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
                     "--json", str(out), *args]) == 0
    plan = json.loads(out.read_text())
    assert all(r["hours"] >= 0 and r["disk_bytes"] >= 0 for r in plan["rules"])
    return {r["rule"]: r["jobs"] for r in plan["rules"]}


@pytest.mark.parametrize("args", [
    ("--configfile", str(REPO / "config" / "demo.yaml")),          # the demo's default targets
    ("--configfile", str(REPO / "config" / "config.yaml"), "tables/table1.csv"),  # the paper's Table 1
    ("--configfile", str(REPO / "config" / "smoke_paper.yaml"), "tables/table1.csv"),
], ids=["demo", "table1", "smoke_paper"])
def test_job_counts_equal_snakemakes_dry_run(tmp_path, args):
    workdir = tmp_path / "work"
    workdir.mkdir()
    sm_args = [a for a in args]
    if "--configfile" in sm_args:
        sm_args.insert(sm_args.index("--configfile") + 2, "--replace-workflow-config")
    expected = snakemake_counts(workdir, *sm_args)
    assert expected.get("pgt", 0) > 0 and expected.get("features", 0) > 0
    assert plan_counts(tmp_path, workdir, *args) == expected


def test_table1_plan_matches_the_paper_grid(tmp_path, capsys):
    workdir = tmp_path / "work"
    workdir.mkdir()
    counts = plan_counts(tmp_path, workdir, "--configfile", str(REPO / "config" / "config.yaml"), "tables/table1.csv")
    # 15 + 12 categories; every refined row of Table 1 runs PGT for 5 seeds.
    assert counts["features"] >= 27 and counts["pgt"] % (27 * 5) == 0 and counts["pgt"] > 0
    text = capsys.readouterr().out
    assert "GPU-hours" in text and re.search(rf"^pgt\s+{counts['pgt']}\s+gpu", text, re.M), text


def test_parse_jobs_reads_rule_wildcards_and_resources():
    text = """
[Tue Dec  1 08:22:18 2026]
rule features:
    input: resources/datasets/demo/.complete
    output: results/features/demo/vit@518/tiles.h5
    wildcards: dataset=demo, backbone=vit, res=518, category=tiles
    resources: tmpdir=/tmp, gpu=1, runtime=60, mem_mb=8000
[Tue Dec  1 08:22:18 2026]
localrule table:
    output: tables/table1.csv, tables/table1.md
"""
    jobs = parse_jobs(text)
    assert [j.rule for j in jobs] == ["features", "table"]
    assert jobs[0].wildcards == {"dataset": "demo", "backbone": "vit", "res": "518", "category": "tiles"}
    assert jobs[0].resources["gpu"] == "1" and jobs[1].output == ["tables/table1.csv", "tables/table1.md"]


PAPER = {
    "datasets": {"mvtec_ad": {"format": "mvtec", "categories": ["bottle", "toothbrush"]}},
    "features": {"dtype": "float16"},
    "backbones": {"vit": {"name": "ViT-L-14-336", "resolution": 518, "layers": ["6", "12", "18", "24"]}},
    "backends": {"musc": {"type": "musc", "backbone": "vit", "options": {"group_size": None}},
                 "musc_star": {"type": "musc", "backbone": "vit", "options": {"group_size": 30}}},
    "refine": {"eval_resolution": 518},
    "pgt": {"group_size": 30},
    "variants": {"default": {}, "u20": {"pgt": {"group_size": 20}}},
}


def test_cost_model_is_the_documented_arithmetic(tmp_path):
    rates = load_rates()
    model = CostModel(PAPER, rates, "gpu", tmp_path)  # nothing on disk: the published counts (bottle 83)
    d = rates["devices"]["gpu"]
    vit = d["backbones"]["ViT-L-14-336"]
    seconds, disk = model.cost(Job("features", {"dataset": "mvtec_ad", "backbone": "vit", "category": "bottle"}))
    assert disk == 83 * (37 * 37 * 1024 * 4 * 2 + 1024 * 4)
    assert seconds == pytest.approx(d["features_job_overhead_s"] + 83 * vit["features_s_per_image"])
    wc = {"dataset": "mvtec_ad", "backend": "musc", "category": "bottle", "seed": "0"}
    seconds, disk = model.cost(Job("coarse", wc))
    assert seconds == pytest.approx(d["coarse_job_overhead_s"] + 83 * 82 * vit["musc_s_per_pair"])
    assert disk == 83 * (37 * 37 * 4 + 4)
    # MuSc*: toothbrush's 42 images in 2 groups of 21
    seconds, _ = model.cost(Job("coarse", dict(wc, backend="musc_star", category="toothbrush")))
    assert seconds == pytest.approx(d["coarse_job_overhead_s"] + 2 * 21 * 20 * vit["musc_s_per_pair"])
    # PGT on toothbrush: group 1 trained (r=5 x l=4 = 20 pseudo-anomalies, 20 epochs), group 2 only refined
    p = d["pgt"]
    seconds, disk = model.cost(Job("pgt", dict(wc, backend="musc_star", category="toothbrush", variant="default")))
    make = p["make_s_per_pseudo_anomaly"] + vit["features_s_per_image"] + 21 * vit["musc_s_per_pair"]
    expected = p["job_overhead_s"] + 42 * p["refine_s_per_image"] + 20 * make + 20 * 20 * p["train_s_per_sample_epoch"]
    assert seconds == pytest.approx(expected)
    assert disk == 42 * (3 * 518 * 518 * 2 + 12)
    # the variant's group size is used: u=20 -> 3 groups of 14, 2 of them trained
    seconds, _ = model.cost(Job("pgt", dict(wc, backend="musc_star", category="toothbrush", variant="u20")))
    make = p["make_s_per_pseudo_anomaly"] + vit["features_s_per_image"] + 14 * vit["musc_s_per_pair"]
    expected = p["job_overhead_s"] + 42 * p["refine_s_per_image"] + 2 * (20 * make + 20 * 20 * p["train_s_per_sample_epoch"])
    assert seconds == pytest.approx(expected)


def test_images_on_disk_are_counted(demo_dataset, tmp_path):
    cfg = dict(PAPER, datasets={"demo": {"format": "demo", "root": str(demo_dataset), "categories": ["tiles"]}})
    model = CostModel(cfg, load_rates(), "cpu", tmp_path)
    assert model.n({"dataset": "demo", "category": "tiles"}) == 12
    with pytest.raises(ValueError, match="mvtec_ad/teapot"):
        CostModel(PAPER, load_rates(), "cpu", tmp_path).n({"dataset": "mvtec_ad", "category": "teapot"})


def test_gpu_check_summary_replaces_its_devices_rates(tmp_path):
    rates = load_rates()
    check = {"schema": "anorefiner-gpu-check/1", "device": "cuda", "device_name": "H200", "quick": False,
             "features": {"resolution": 518, "img_per_s": 400.0, "preprocess_s_per_image": 0.001},
             "musc": {"n_images": 200, "grid": 37, "channels": 1024, "layers": 4, "seconds": 39.8},
             "pgt": {"resolution": 518, "n_images": 60, "group_size": 30, "n_pseudo_anomalies": 20, "epochs": 20,
                     "timings": {"train_s": 8.0, "refine_s": 0.6, "synthesis_s": 2.0}}}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(check))
    new = load_rates(str(path))
    vit = new["devices"]["gpu"]["backbones"]["ViT-L-14-336"]
    assert vit["features_s_per_image"] == pytest.approx(1 / 400)
    assert vit["musc_s_per_pair"] == pytest.approx(39.8 / (200 * 199))
    assert new["devices"]["gpu"]["pgt"]["train_s_per_sample_epoch"] == pytest.approx(8.0 / 400)
    assert new["devices"]["gpu"]["pgt"]["refine_s_per_image"] == pytest.approx(0.01)
    make = 2.0 / 20 - 1 / 400 - 30 * vit["musc_s_per_pair"]
    assert new["devices"]["gpu"]["pgt"]["make_s_per_pseudo_anomaly"] == pytest.approx(make)
    assert "H200" in new["devices"]["gpu"]["source"]
    slow_io = dict(check, features={"resolution": 518, "img_per_s": 400.0, "preprocess_s_per_image": 0.01})
    got = rates_from_gpu_check(rates, slow_io, "x")["devices"]["gpu"]["backbones"]["ViT-L-14-336"]
    assert got["features_s_per_image"] == pytest.approx(0.01)  # decoding, not the GPU, sets the pace
    assert new["devices"]["cpu"] == rates["devices"]["cpu"]  # the other device keeps its defaults
    # measured at a smaller geometry: scaled to 37^2 tokens x 1024 channels x 4 layers
    small = dict(check, musc={"n_images": 10, "grid": 16, "channels": 1024, "layers": 2, "seconds": 1.0})
    got = rates_from_gpu_check(rates, small, "x")["devices"]["gpu"]["backbones"]["ViT-L-14-336"]["musc_s_per_pair"]
    assert got == pytest.approx(1.0 / 90 * (37 * 37 / 256) ** 2 * 2)
    with pytest.raises(ValueError, match="not a benchmarks/gpu_check.py summary"):
        rates_from_gpu_check(rates, {"schema": "other"}, "x.json")
    assert math.isfinite(vit["musc_s_per_pair"])


def test_trained_backends_are_priced(tmp_path):
    """train_backend: auxiliary test images x epochs x the type's factor of a forward; official files only
    download; image-scoring backends pay their forward in coarse."""
    from anorefiner.commands.plan import load_config

    rates = load_rates()
    config = load_config(Path(__file__).resolve().parents[3] / "config" / "config.yaml")  # the paper's
    model = CostModel(config, rates, "gpu", tmp_path)  # nothing on disk: the published counts
    d = rates["devices"]["gpu"]
    vit = d["backbones"]["ViT-L-14-336"]
    n_visa = sum(rates["test_images"]["visa"].values())  # 2162: VisA's test split trains the MVTec AD weights
    t = d["train_backend"]
    seconds, disk = model.cost(Job("train_backend", {"backend": "vcp_clip", "source": "trained", "dataset": "visa"}))
    expected = t["job_overhead_s"] + n_visa * 10 * vit["features_s_per_image"] * t["image_epoch_factor"]["vcp_clip"]
    assert seconds == pytest.approx(expected)  # 10 epochs: VCP-CLIP's TrainConfig default
    assert disk == rates["checkpoint_bytes"]["vcp_clip"]
    # APRIL-GAN on MVTec AD: the config's 3 epochs
    n_mvtec = sum(rates["test_images"]["mvtec_ad"].values())
    seconds, _ = model.cost(Job("train_backend", {"backend": "april_gan", "source": "trained", "dataset": "mvtec_ad"}))
    assert seconds == pytest.approx(t["job_overhead_s"] + n_mvtec * 3 * vit["features_s_per_image"])
    assert model.cost(Job("train_backend", {"backend": "anomalyclip", "source": "official", "dataset": "visa"}))[0] == 0
    wc = {"dataset": "mvtec_ad", "backend": "adaclip", "category": "bottle", "seed": "0"}
    seconds, _ = model.cost(Job("coarse", wc))
    assert seconds == pytest.approx(d["coarse_job_overhead_s"]
                                    + 83 * vit["features_s_per_image"] * d["coarse_image_factor"]["adaclip"])
