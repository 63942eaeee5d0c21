"""benchmarks/gpu_check.py: one command, every section present, a JSON that `anorefiner plan` can read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SECTIONS = ("environment", "features", "musc", "pgt", "run", "agreement")


def run_check(tmp_path: Path, device: str) -> tuple[dict, str]:
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", ANOREFINER_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", device, "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert json.loads(proc.stdout) == summary  # the same summary is printed and written
    return summary, proc.stderr


def check_summary(summary: dict) -> None:
    assert summary["schema"] == "anorefiner-gpu-check/1" and summary["quick"] is True
    for name in SECTIONS:
        assert name in summary and "error" not in summary[name], (name, summary.get(name))
    feats, musc, pgt, run = summary["features"], summary["musc"], summary["pgt"], summary["run"]
    assert feats["backbone"] == "ViT-L-14-336" and feats["weights"].startswith("random")
    assert feats["img_per_s"] > 0 and feats["grid"] == 8
    assert musc["seconds"] > 0 and musc["n_images"] == 8 and musc["layers"] == 4
    assert pgt["trained_groups"] == 1 and pgt["ard"] == {"anomaly_channels": 64, "feat_channels": 256, "aa_channels": 192}
    assert pgt["timings"]["train_s"] > 0 and len(pgt["final_dice_loss"]) == 1
    assert {"coarse/pixel_auroc", "ard/pixel_auroc", "combined/pixel_auroc"} <= set(run["metrics"])
    assert all(0.0 <= v <= 1.0 for v in run["metrics"].values())


def test_cpu_quick_runs_every_section(tmp_path):
    summary, log = run_check(tmp_path, "cpu")
    check_summary(summary)
    agree = summary["agreement"]
    # one device: the float32 candidate is the reference itself; bf16 autocast differs but stays close
    assert agree["features_max_rel_err"] == 0.0 and agree["musc_max_abs_diff"] == 0.0
    assert agree["ard_max_abs_diff"] == 0.0
    assert 0.0 < agree["features_autocast_max_rel_err"] < 0.1
    assert summary["total_s"] < 300
    # the summary is a valid `anorefiner plan --rates` input (CPU rates replaced)
    from anorefiner.commands.plan import load_rates

    path = tmp_path / "gpu_check.json"
    rates = load_rates(str(path))
    assert str(path) in rates["devices"]["cpu"]["source"]
    assert rates["devices"]["cpu"]["backbones"]["ViT-L-14-336"]["features_s_per_image"] > 0


@pytest.mark.gpu
def test_cuda_agrees_with_cpu(tmp_path):
    summary, _ = run_check(tmp_path, "cuda")
    check_summary(summary)
    agree = summary["agreement"]
    assert agree["features_max_rel_err"] < 1e-2  # TF32 matmuls on CUDA
    assert agree["musc_max_abs_diff"] < 1e-2 * agree["musc_map_range"]
    assert agree["ard_max_abs_diff"] < 1e-2 * max(agree["ard_logit_range"], 1e-6)
