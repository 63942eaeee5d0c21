"""A job that asked for a GPU gets CUDA or fails within seconds naming the node's problem (issue 23, item 4)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

import pytest
import torch

from anorefiner.backbones import cuda_problem, resolve_device


def test_cuda_request_names_the_nodes_problem(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    if torch.cuda.is_available():  # a GPU host: the emptied CUDA_VISIBLE_DEVICES only applies to a new process
        pytest.skip("CUDA is usable in this process")
    problem = cuda_problem()
    assert problem and "CUDA_VISIBLE_DEVICES=''" in problem
    with pytest.raises(ValueError, match=rf"CUDA is unusable on node {platform.node()}: "):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")  # only an explicit request fails


def test_gpu_job_fails_fast_before_any_work(tmp_path):
    """`anorefiner features --device cuda` (what the workflow passes to a GPU job) on a node without usable CUDA
    exits 1 before reading its dataset (the root does not even exist), within the interpreter's start-up."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", SLURM_JOB_ID="4242")
    cmd = [sys.executable, "-m", "anorefiner", "features", "--root", str(tmp_path / "absent"), "--dataset", "demo",
           "--category", "tiles", "--backbone", "resnet50", "--resolution", "64", "--pretrained", "none",
           "--device", "cuda", "--out", str(tmp_path / "f.h5")]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"CUDA is unusable on node {platform.node()}" in proc.stderr and "SLURM_JOB_ID=4242" in proc.stderr
    assert "absent" not in proc.stderr and not (tmp_path / "f.h5").exists()
    assert elapsed < 60, elapsed  # torch's import, not a job's worth of CPU work
