"""The demo pipeline through a real SLURM cluster (single node on localhost), compared to a local run.

Installs Debian's slurm packages when they are missing (needs root and apt-get; skips with the
reason otherwise), starts munged, slurmctld and slurmd from a private configuration (two partitions,
`cpu` and `gpu`, and a node whose `gpu` generic resource is two device files that are not GPUs), runs the tiny
workflow with profiles/slurm exactly as docs/cluster.md shows, and stops the daemons it started by
their process ids. `scontrol show job` then says which partition and how many GPUs each job got: the
jobs that ask for a GPU are on `gpu` with one, the others on `cpu` with none, and the dataset
download (a network rule) ran on the submitting machine.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, snakemake, tiny_config

pytestmark = pytest.mark.slurm

PACKAGES = ["slurmctld", "slurmd", "munge", "slurm-client"]
DAEMONS = ["slurmctld", "slurmd", "munged", "sinfo", "sbatch", "squeue"]


def _have_slurm() -> bool:
    return all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS)


def _install_slurm() -> str | None:
    """Install the packages if needed; return a reason to skip, or None."""
    if _have_slurm():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "SLURM is not installed and packages cannot be installed here (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=900)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not _have_slurm():
        return f"could not install {' '.join(PACKAGES)} from Debian's packages: {proc.stderr[-500:]}"
    return None


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _slurm_conf(base: Path) -> str:
    mem_mb = int(int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 1024 * 0.9)
    return f"""\
ClusterName=anorefiner-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=7200
GresTypes=gpu
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem_mb} Gres=gpu:{GPUS} State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
"""


# The node's `gpu` GRES: two character devices that are not GPUs (slurmd 22.05 registers no count-only `gpu`
# GRES, and rejects regular files): scheduled and accounted like GPUs, nothing behind them.
GPU_FILES = ("/dev/null", "/dev/zero")
GPUS = len(GPU_FILES)
# rules declaring `gpu: compute.gpu` (workflow/rules/*.smk) that the tiny demo runs
GPU_RULES = {"features", "coarse", "pgt"}


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    reason = _install_slurm()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (base / sub).mkdir()
    # Job steps (srun inside the batch job) look for the configuration at the standard path, not
    # at SLURM_CONF: install ours there and put back whatever was there before.
    conf = Path("/etc/slurm/slurm.conf")
    conf.parent.mkdir(parents=True, exist_ok=True)
    previous = conf.read_bytes() if conf.exists() else None
    conf.write_text(_slurm_conf(base))
    gres = conf.with_name("gres.conf")
    previous_gres = gres.read_bytes() if gres.exists() else None
    gres.write_text("".join(f"NodeName=localhost Name=gpu File={dev}\n" for dev in GPU_FILES))
    env = dict(os.environ, SLURM_CONF=str(conf))

    munge = pwd.getpwnam("munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
    os.chown(key, munge.pw_uid, munge.pw_gid)
    key.chmod(0o400)
    for d in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        os.chown(d, munge.pw_uid, munge.pw_gid)

    procs: list[subprocess.Popen] = []
    logs = open(base / "daemons.log", "w")
    try:
        # Foreground daemons (-F / -D) so the pids we hold are the daemons themselves.
        procs.append(subprocess.Popen([_sbin("munged"), "-F", "--force"], user=munge.pw_uid, group=munge.pw_gid,
                                      stdout=logs, stderr=logs))
        time.sleep(1)
        procs.append(subprocess.Popen([_sbin("slurmctld"), "-D", "-i", "-f", str(conf)], env=env, stdout=logs, stderr=logs))
        time.sleep(1)
        procs.append(subprocess.Popen([_sbin("slurmd"), "-D", "-f", str(conf)], env=env, stdout=logs, stderr=logs))
        deadline = time.time() + 60
        state = ""
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            state = out.stdout.strip()
            if state.startswith("idle"):
                break
            time.sleep(1)
        else:
            pytest.fail(f"SLURM node never became idle (sinfo: {state!r}); logs in {base}")
        yield env
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        logs.close()
        for path, content in ((conf, previous), (gres, previous_gres)):
            if content is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(content)


def _profile_for_test(workdir: Path) -> Path:
    """profiles/slurm as shipped (its partitions are named `cpu` and `gpu`, as the test cluster's), with
    partitions.yaml's max_gpu set to this node's GPUs."""
    profile = workdir / "profiles" / "slurm"
    profile.mkdir(parents=True)
    shutil.copy(REPO / "profiles/slurm/config.yaml", profile / "config.yaml")
    partitions = yaml.safe_load((REPO / "profiles/slurm/partitions.yaml").read_text())
    assert set(partitions["partitions"]) == {"cpu", "gpu"}
    partitions["partitions"]["gpu"]["max_gpu"] = GPUS
    (profile / "partitions.yaml").write_text(yaml.safe_dump(partitions))
    return profile


def _mvtec_archive(tmp_path: Path) -> dict:
    """A tiny MVTec-layout archive on disk: config of a dataset whose rule `download` (a network rule) runs."""
    from tests.unit.data.test_download import mvtec_archive

    data = mvtec_archive()
    path = tmp_path / "mvtec_anomaly_detection.tar.xz"
    path.write_bytes(data)
    # categories: the schema's MVTec AD names (nothing reads them: only the download runs)
    return {"format": "mvtec", "archive": str(path), "sha256": hashlib.sha256(data).hexdigest(),
            "categories": ["bottle"]}


def _scontrol_jobs(log: str, env: dict) -> list[dict]:
    """Rule, partition and GPUs of every job the run submitted (scontrol keeps them for MinJobAge)."""
    jobs = []
    for jobid in sorted(set(re.findall(r"submitted with SLURM jobid (\d+)", log, re.I)), key=int):
        text = subprocess.run(["scontrol", "show", "job", jobid], env=env, capture_output=True, text=True).stdout
        rule = re.search(r"Comment=rule_(\w+?)(?:_wildcards_\S*)?\s", text)
        gpus = re.search(r"gres[/:]gpu[:=](\d+)", text)  # TresPerJob=gres:gpu:1 (22.05), AllocTRES=...gres/gpu=1
        jobs.append({"id": jobid, "rule": rule.group(1) if rule else text,
                     "partition": re.search(r"Partition=(\S+)", text).group(1),
                     "gpus": int(gpus.group(1)) if gpus else 0, "scontrol": text})
    return jobs


def test_demo_through_slurm_matches_local_run(slurm_cluster, tiny_run, tmp_path, monkeypatch):
    for key, value in slurm_cluster.items():
        monkeypatch.setenv(key, value)
    local_dir, _, _ = tiny_run
    cfg = tiny_config(REPO / "config" / "tables")
    # The GPU stages ask for a GPU (the test cluster's GRES) but compute on the CPU: there is no CUDA here.
    cfg["compute"] = {"gpu": 1, "device": "cpu", "threads": 1}
    cfg["datasets"]["mvtec_ad"] = _mvtec_archive(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    profile = _profile_for_test(tmp_path)
    # docs/cluster.md's command for a cluster without accounting (sacct), as typed there.
    proc = snakemake(
        tmp_path, config, "--profile", str(profile), "--slurm-no-account", "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "2", "--jobs", "4", "default",
        "resources/datasets/mvtec_ad/.complete", timeout=1800,
    )
    log = proc.stdout + proc.stderr
    assert (tmp_path / "tables/demo_table1.csv").read_bytes() == (local_dir / "tables/demo_table1.csv").read_bytes()
    # the rendered table too, but for the hash of the resolved configuration: this run's asks for a GPU and adds
    # a dataset
    same = [[line for line in (d / "tables/demo_table1.md").read_text().splitlines()
             if not line.startswith("- Resolved configuration sha256:")] for d in (tmp_path, local_dir)]
    assert same[0] == same[1]
    jobs = _scontrol_jobs(log, slurm_cluster)
    rules = {j["rule"] for j in jobs}
    assert {"features", "coarse", "pgt", "metrics", "table"} <= rules, jobs
    for job in jobs:
        wanted = ("gpu", 1) if job["rule"] in GPU_RULES else ("cpu", 0)
        assert (job["partition"], job["gpus"]) == wanted, job["scontrol"]
    assert "download" not in rules and re.search(r"^localrule download:", log, re.M), log[-3000:]
    assert (tmp_path / "resources/datasets/mvtec_ad/.complete").is_file()
