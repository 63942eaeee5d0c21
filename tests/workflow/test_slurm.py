"""The demo pipeline through a real SLURM cluster (single node on localhost), compared to a local run.

Installs Debian's slurm packages when they are missing (needs root and apt-get; skips with the
reason otherwise), starts munged, slurmctld and slurmd from a private configuration, runs the tiny
workflow with `--profile profiles/slurm` exactly as the README's SLURM section shows (only the
partition names differ), and stops the daemons it started by their process ids.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import REPO, snakemake, write_config

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
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


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
        if previous is None:
            conf.unlink(missing_ok=True)
        else:
            conf.write_bytes(previous)


def _profile_for_test(workdir: Path) -> Path:
    """profiles/slurm with the partition placeholders pointed at the test cluster's `debug`."""
    text = (REPO / "profiles/slurm/config.yaml").read_text()
    text = text.replace('slurm_partition: "cpu"', 'slurm_partition: "debug"')
    text = text.replace('slurm_partition: "gpu"', 'slurm_partition: "debug"')
    profile = workdir / "profiles" / "slurm"
    profile.mkdir(parents=True)
    (profile / "config.yaml").write_text(text)
    return profile


def test_demo_through_slurm_matches_local_run(slurm_cluster, tiny_run, tmp_path, monkeypatch):
    for key, value in slurm_cluster.items():
        monkeypatch.setenv(key, value)
    local_dir, _, _ = tiny_run
    cfg = write_config(tmp_path)
    profile = _profile_for_test(tmp_path)
    # The README's SLURM command for a cluster without accounting (sacct), as typed there.
    proc = snakemake(
        tmp_path, cfg, "--profile", str(profile), "--slurm-no-account", "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "2", "--jobs", "4", timeout=1800,
    )
    log = proc.stdout + proc.stderr
    assert re.search(r"submitted with SLURM jobid \d+", log, re.I), log[-3000:]
    for name in ("tables/demo_table1.csv", "tables/demo_table1.md"):
        assert (tmp_path / name).read_bytes() == (local_dir / name).read_bytes(), name
