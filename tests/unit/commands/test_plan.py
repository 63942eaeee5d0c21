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
    ("--configfile", str(REPO / "config" / "demo.yaml"), "--replace-workflow-config"),  # the demo's default targets
    ("tables/table1.csv",),  # the paper's Table 1
    ("tables/table1.csv", "--configfile", str(REPO / "config" / "smoke_paper.yaml"), "--replace-workflow-config"),
], ids=["demo", "table1", "smoke_paper"])
def test_job_counts_equal_snakemakes_dry_run(tmp_path, args):
    workdir = tmp_path / "work"
    workdir.mkdir()
    sm_args = list(args) if "--configfile" in args else [*args, "--configfile", str(REPO / "config" / "config.yaml")]
    expected = snakemake_counts(workdir, *sm_args)
    assert expected.get("pgt", 0) > 0 and expected.get("features", 0) > 0
    assert plan_counts(tmp_path, workdir, *args) == expected


def test_table1_plan_matches_the_paper_grid(tmp_path, capsys):
    workdir = tmp_path / "work"
    workdir.mkdir()
    counts = plan_counts(tmp_path, workdir, "tables/table1.csv")
    # 15 + 12 categories; every refined row of Table 1 runs PGT for 5 seeds.
    assert counts["features"] >= 27 and counts["pgt"] % (27 * 5) == 0 and counts["pgt"] > 0
    text = capsys.readouterr().out
    assert "GPU-hours" in text and re.search(rf"^pgt\*?\s+{counts['pgt']}\s+gpu", text, re.M), text


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


def test_aa_clip_and_bayes_pfl_are_priced_over_both_training_stages(tmp_path):
    """Their TrainConfig.epochs is the sum of the two stages (AA-CLIP 5 + 20, Bayes-PFL 25 + 5); both pay their
    per-image work in coarse; nothing is left unpriced."""
    from anorefiner.commands.plan import load_config

    rates = load_rates()
    config = load_config(Path(__file__).resolve().parents[3] / "config" / "config.yaml")
    model = CostModel(config, rates, "gpu", tmp_path)
    d = rates["devices"]["gpu"]
    vit, t = d["backbones"]["ViT-L-14-336"], d["train_backend"]
    n_visa = sum(rates["test_images"]["visa"].values())
    for backend, epochs in (("aa_clip", 25), ("bayes_pfl", 30)):
        seconds, disk = model.cost(Job("train_backend", {"backend": backend, "source": "trained", "dataset": "visa"}))
        factor = t["image_epoch_factor"][backend]
        assert seconds == pytest.approx(t["job_overhead_s"] + n_visa * epochs * vit["features_s_per_image"] * factor)
        assert disk == rates["checkpoint_bytes"][backend] > 0
        seconds, _ = model.cost(Job("coarse", {"dataset": "mvtec_ad", "backend": backend, "category": "bottle",
                                               "seed": "0"}))
        assert seconds == pytest.approx(d["coarse_job_overhead_s"] + 83 * vit["features_s_per_image"]
                                        * d["coarse_image_factor"][backend])
        assert rates["devices"]["cpu"]["coarse_image_factor"][backend] > 0
    assert not model.notes


def test_table1_plan_prices_every_rule(tmp_path):
    """TTA, training and the downloads cost something; no rule goes unpriced; estimates are marked."""
    out = tmp_path / "plan.json"
    assert cli_main(["plan", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--json", str(out),
                     "tables/table1.csv"]) == 0
    plan = json.loads(out.read_text())
    rules = {r["rule"]: r for r in plan["rules"]}
    assert not [n for n in plan["notes"] if "no rate" in n or "not priced" in n], plan["notes"]
    for rule in ("tta", "train_backend", "download", "weights", "features", "coarse", "pgt", "metrics"):
        assert rules[rule]["hours"] > 0 and rules[rule]["estimate"], rule  # GPU rates: all estimates so far
    assert rules["tta"]["on"] == "gpu" and rules["download"]["on"] == "cpu"


def test_rareclip_coarse_factors_belong_to_their_devices():
    """GPU: RareCLIP's README (~60 ms per image on an RTX 3090); CPU: the measured ~2 s per image."""
    d = load_rates()["devices"]
    per_image = {k: d[k]["coarse_image_factor"]["rareclip"] * d[k]["backbones"]["ViT-L-14-336"]["features_s_per_image"]
                 for k in ("gpu", "cpu")}
    assert per_image["gpu"] == pytest.approx(0.06) and per_image["cpu"] == pytest.approx(2.0, rel=0.05)


def test_tta_and_downloads_are_priced(tmp_path):
    from anorefiner.commands.plan import load_config

    rates = load_rates()
    config = load_config(REPO / "config" / "config.yaml")
    model = CostModel(config, rates, "gpu", tmp_path)
    d = rates["devices"]["gpu"]
    vit = d["backbones"]["ViT-L-14-336"]
    wc = {"dataset": "mvtec_ad", "backend": "musc_star_sar", "category": "bottle", "seed": "0"}
    base, _ = model.cost(Job("coarse", dict(wc, backend="musc_star")))
    seconds, _ = model.cost(Job("tta", wc))
    assert seconds == pytest.approx(base + d["tta"]["job_overhead_s"] + 83 * vit["features_s_per_image"] * 7.0)
    seconds, disk = model.cost(Job("weights", {"model": "ViT-L-14-336", "tag": "openai"}))
    assert disk == rates["weights_bytes"]["ViT-L-14-336"] and seconds == pytest.approx(disk / 20e6)
    seconds, disk = model.cost(Job("official_checkpoint", {"backend": "april_gan", "dataset": "visa"}))
    assert disk == rates["checkpoint_bytes"]["april_gan"] and seconds > 0


def test_seas_training_generation_and_weights_are_priced(tmp_path):
    """train_seas: both stages, 800 optimiser steps per defect type each; pgt of the seas variant generates its
    pseudo-anomalies with SeaS; sd_weights downloads Stable Diffusion."""
    from anorefiner.commands.plan import load_config

    rates = load_rates()
    config = load_config(REPO / "config" / "config.yaml")
    model = CostModel(config, rates, "gpu", tmp_path)  # nothing on disk: the published defect-type counts
    s = rates["devices"]["gpu"]["seas"]
    seconds, disk = model.cost(Job("train_seas", {"dataset": "mvtec_ad", "category": "cable"}))
    assert seconds == pytest.approx(s["job_overhead_s"] + 8 * 800 * (s["generation_s_per_step"] + s["mask_s_per_step"]))
    assert disk == rates["seas_model_bytes"]
    wc = {"dataset": "mvtec_ad", "backend": "musc_star", "category": "bottle", "seed": "0"}
    perlin, _ = model.cost(Job("pgt", dict(wc, variant="default")))
    seas, _ = model.cost(Job("pgt", dict(wc, variant="seas")))
    # bottle: 83 images in 3 groups of u = 30, 2 trained (the last is not), r x l = 20 pseudo-anomalies each
    make = rates["devices"]["gpu"]["pgt"]["make_s_per_pseudo_anomaly"]
    assert seas - perlin == pytest.approx(s["job_overhead_s"] + 2 * 20 * (s["generate_s_per_image"] - make))
    seconds, disk = model.cost(Job("sd_weights", {"model": "stable-diffusion-v1-4", "revision": "0" * 40}))
    assert disk == rates["weights_bytes"]["stable-diffusion-v1-4"] and seconds == pytest.approx(disk / 20e6)


def test_configfile_merges_over_the_paper_config_as_snakemake_does(tmp_path):
    """A partial --configfile (one seed) is merged over config/config.yaml, not used alone."""
    (tmp_path / "work").mkdir()
    one_seed = tmp_path / "one_seed.yaml"
    one_seed.write_text("tables: {seeds: [0]}\n")
    counts = plan_counts(tmp_path, tmp_path / "work", "tables/table1.csv", "--configfile", str(one_seed))
    expected = snakemake_counts(tmp_path / "work", "tables/table1.csv", "--configfile",
                                str(REPO / "config" / "config.yaml"), str(one_seed), "--replace-workflow-config")
    assert counts == expected and counts["pgt"] == 81  # 27 categories x 3 refined rows x 1 seed


def test_a_bad_config_prints_the_validation_error_not_the_schema(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("compute: {device: gpu}\nbackends: {musc: {type: musc, backbone: vit_l14_336, wieghts: x}}\n")
    with pytest.raises(ValueError) as err:
        cli_main_raising(["plan", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                          "tables/table1.csv", "--configfile", str(bad)])
    text = str(err.value)
    assert "ValidationError" in text and "On instance" in text, text
    assert "'properties'" not in text and "'enum'" not in text, text  # no schema dump


def test_a_standalone_config_needs_replace_workflow_config(tmp_path):
    with pytest.raises(ValueError, match="demo.yaml is a whole configuration.*--replace-workflow-config"):
        cli_main_raising(["plan", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                          "--configfile", str(REPO / "config" / "demo.yaml")])


def cli_main_raising(argv):
    """``anorefiner plan`` as a function, its error raised (the CLI logs it and returns 1)."""
    from anorefiner.cli import build_parser

    args = build_parser().parse_args(argv)
    return args._module.main(args)


def test_docs_quote_the_current_plan_of_table1(tmp_path, capsys):
    """docs/cluster.md shows `anorefiner plan tables/table1.csv` as it prints today (regenerate it when this fails:
    the command is in the block's first line)."""
    text = (REPO / "docs" / "cluster.md").read_text()
    quoted = text.split("<!-- plan:table1 -->\n```text\n", 1)[1].split("```", 1)[0]
    assert cli_main(["plan", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                     "tables/table1.csv"]) == 0
    printed = capsys.readouterr().out
    assert quoted.split("\n", 1)[1].strip() == printed.strip()


def test_fewshot_training_is_priced_per_category(tmp_path):
    """train_fewshot: the images an epoch sees x epochs x the type's factor of a forward, plus decoding them once."""
    from anorefiner.commands.plan import load_config

    rates = load_rates()
    config = load_config(REPO / "config" / "config.yaml")
    model = CostModel(config, rates, "gpu", tmp_path)
    d = rates["devices"]["gpu"]
    t = d["train_fewshot"]
    wc = {"backend": "regad_4shot", "dataset": "mvtec_ad", "category": "bottle", "draw": "others"}
    seconds, disk = model.cost(Job("train_fewshot", wc))
    r18 = d["backbones"]["resnet18"]
    others = sum(n for c, n in rates["train_images"]["mvtec_ad"].items() if c != "bottle")
    assert others == 3629 - 209
    forward = r18["features_s_per_image"]  # the backbone's own resolution (224)
    want = t["job_overhead_s"] + (others + others * 5 * 50 * t["image_epoch_factor"]["regad"]) * forward
    assert seconds == pytest.approx(want) and disk == rates["checkpoint_bytes"]["regad"]
    wc = {"backend": "mvfa_ad_4shot", "dataset": "mvtec_ad", "category": "bottle", "draw": "seed0"}
    vit = d["backbones"]["ViT-L-14-336"]
    forward = vit["features_s_per_image"] * (238 / 518) ** 2
    want = t["job_overhead_s"] + (4 + 4 * 11 * 50 * t["image_epoch_factor"]["mvfa_ad"]) * forward
    assert model.cost(Job("train_fewshot", wc))[0] == pytest.approx(want)
    assert not [n for n in model.notes if "not priced" in n]
