"""The paper's Table 1 as the SLURM profile would submit it (dry run, issue 23): every job that asks for a GPU
goes to a GPU partition and must get CUDA; the others go to a CPU partition; a bare `snakemake` is small."""

from __future__ import annotations

import re
import subprocess
import sys
from types import SimpleNamespace

from .conftest import REPO


def _dry_run(*args: str) -> str:
    cmd = [sys.executable, "-m", "snakemake", "-n", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _jobs(text: str) -> list[dict]:
    """Rule, resources and shell command of each job of a dry run (printshellcmds)."""
    from anorefiner.commands.plan import _fields

    jobs = []
    for block in re.split(r"^\[.*\]\n", text, flags=re.M)[1:]:
        head = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        res = re.search(r"^    resources: (.*)$", block, re.M)
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        if head:
            jobs.append({"rule": head.group(1), "resources": _fields(res.group(1)) if res else {},
                         "shell": shell.group(1) if shell else ""})
    return jobs


def _partition(job: dict) -> str | None:
    """The partition snakemake-executor-plugin-slurm chooses for the job from profiles/slurm/partitions.yaml
    (its own scoring, applied to the resources Snakemake resolved for the job)."""
    from snakemake_executor_plugin_slurm.partitions import read_partition_file

    partitions = read_partition_file(REPO / "profiles" / "slurm" / "partitions.yaml")
    resources = {k: (int(v) if v.isdigit() else v) for k, v in job["resources"].items()}
    stand_in = SimpleNamespace(resources=resources, threads=int(resources.get("_cores", 1)), name=job["rule"])
    scores = [(p.score_job_fit(stand_in), p.name) for p in partitions]
    return max((s, n) for s, n in scores if s is not None)[1]


def test_table1_gpu_jobs_go_to_the_gpu_partition_and_require_cuda():
    jobs = _jobs(_dry_run("--workflow-profile", "profiles/slurm", "--slurm-no-account", "tables/table1.csv"))
    gpu = [j for j in jobs if int(j["resources"].get("gpu", 0)) > 0]
    assert {j["rule"] for j in gpu} == {"features", "coarse", "tta", "pgt", "train_backend"}
    assert sum(j["rule"] == "tta" for j in gpu) == 1215
    for job in jobs:
        on_gpu = job in gpu
        assert _partition(job) == ("gpu" if on_gpu else "cpu"), job
        assert ("--device cuda" in job["shell"]) == on_gpu, job["shell"]
        assert "slurm_partition" not in job["resources"], job  # routed by partitions.yaml, not per rule
        if job["rule"] not in ("download", "weights", "official_checkpoint"):
            assert job["shell"].startswith("HF_HUB_OFFLINE=1 "), job["shell"]  # compute jobs never reach the hub
    assert {j["rule"] for j in jobs} >= {"download", "weights"}


def test_bare_snakemake_prints_how_to_start_with_one_gpu_job_at_a_time(tmp_path):
    """A bare `snakemake` (profiles/default applies as the workflow profile) runs one job that prints the
    targets to choose from, and the local run allows one GPU job at a time (resources: gpu)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(REPO / "config" / "config.yaml")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert re.search(r"^default\s+1$", text, re.M) and re.search(r"^total\s+1$", text, re.M), text[-2000:]
    assert "snakemake all_tables" in text and "anorefiner plan tables/table1.csv" in text
    assert re.search(r"Provided resources: gpu=.*\b1\b", text), text[:2000]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".snakemake", "logs"]  # nothing else was made


def test_official_checkpoints_are_fetched_by_a_local_rule_not_a_gpu_job(tmp_path):
    """`weights: official` (APRIL-GAN's git-blob-checked files): rule official_checkpoint (a local rule, no GPU)
    replaces the training job."""
    import yaml

    path = tmp_path / "official.yaml"
    path.write_text(yaml.safe_dump({"backends": {"april_gan": {"weights": "official"}}}))
    jobs = _jobs(_dry_run("--workflow-profile", "profiles/slurm", "--slurm-no-account", "tables/table1.csv",
                          "--configfile", str(path)))
    official = [j for j in jobs if j["rule"] == "official_checkpoint"]
    assert len(official) == 2 and all("gpu" not in j["resources"] for j in official)
    assert all("--official default" in j["shell"] and "--device" not in j["shell"] for j in official)
    assert not any(j["rule"] == "train_backend" and "april_gan" in j["shell"].split("--backend-type ")[1][:9]
                   for j in jobs)
