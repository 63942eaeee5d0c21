"""A tiny end-to-end configuration of the real workflow (real Snakemake, real weights, minutes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def tiny_config(tables_dir: Path) -> dict:
    """The demo pipeline shrunk to 2 categories of 12 test images at 64 px (2 PGT groups of 6)."""
    return {
        "targets": [
            "tables/demo_table1.csv",
            "tables/audit.md",
            "figures/demo/musc_star/default/seed0/qualitative.png",
            "figures/demo/musc_star/default/seed0/bars.png",
        ],
        "datasets": {
            "demo": {
                "format": "demo",
                "categories": ["tiles", "widget"],
                "generator": {"image_size": 64, "n_train": 4, "n_test": 12, "seed": 0},
            }
        },
        "features": {"batch_size": 12, "dtype": "float16", "compression": "none"},
        "backbones": {"effnet": {"name": "efficientnet_lite0", "pretrained": "imagenet", "resolution": 64}},
        "backends": {
            "musc": {"type": "musc", "backbone": "effnet", "options": {"group_size": None, "rscin": False}},
            "musc_star": {"type": "musc", "backbone": "effnet", "options": {"group_size": 6, "rscin": False}},
            "paclip": {"type": "paclip", "backbone": "effnet", "options": {}},
        },
        "refine": {"textures": "offline", "eval_resolution": 64},
        "ard": {"feat_channels": 16, "anomaly_channels": 8, "aa_channels": 8},
        # first_group_ard "coarse": a 2-epoch ARD outputs a near-constant map, and with group 1 all zeros the
        # ARD map's PRO has no threshold with FPR < 0.3 (NaN, as in MuSc's PRO); the coarse option keeps every
        # metric defined, which the tests below check, and runs that option through the workflow.
        "pgt": {"group_size": 6, "epochs": 2, "n_pseudo_normal": 2, "n_anomalies_per_normal": 2,
                "first_group_ard": "coarse"},
        "synthesis": {},
        "variants": {"default": {}},
        "evaluation": {"resolution": 64, "mask_resize": "nearest", "pro_variant": "musc", "compute_pro": True},
        "tables": {"seeds": [0], "tolerance": 1.0, "datasets": {"MVTec AD": "demo"},
                   "dir": str(tables_dir), "names": ["demo_table1"]},
        "figures": {"runs": [{"dataset": "demo", "backend": "musc_star", "variant": "default", "seed": 0}]},
        "compute": {"gpu": 0, "device": "cpu", "threads": 1},
    }


def trained_backend_config(work: Path, title: str, rows: list[dict], backbones: dict, backends: dict,
                           n_aux_test: int = 8, **sections) -> Path:
    """A tiny config scoring demo/widget with trained CLIP backends: a generated auxiliary dataset (registered
    as ``mvtec_ad``, its test split trains the backends), a one-table declaration of ``rows`` in
    ``work/tables``, and the config file it writes (``work/trained.yaml``); ``sections`` replace config
    sections (e.g. ``tta``)."""
    from anorefiner.data.demo import generate_demo

    aux_root = work / "aux_data"
    generate_demo(aux_root, categories=("tiles",), image_size=64, n_train=2, n_test=n_aux_test, seed=1)
    tables = work / "tables"
    tables.mkdir()
    (tables / "demo_table1.yaml").write_text(yaml.safe_dump({
        "title": title, "published": None, "datasets": ["MVTec AD"],
        "columns": {"AUROC-cls": "image_auroc", "AUROC-segm": "pixel_auroc"}, "rows": rows,
    }, sort_keys=False))
    cfg = tiny_config(tables)
    cfg["targets"] = ["tables/demo_table1.csv"]
    cfg["datasets"]["demo"]["categories"] = ["widget"]
    cfg["datasets"]["mvtec_ad"] = {"format": "mvtec", "root": str(aux_root), "categories": ["tile"]}
    cfg["backbones"], cfg["backends"] = backbones, backends
    cfg["figures"] = {"runs": []}
    cfg.update(sections)
    path = work / "trained.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def write_config(workdir: Path, **overrides) -> Path:
    cfg = tiny_config(REPO / "config" / "tables")
    cfg.update(overrides)
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(workdir: Path, configfile: Path, *extra: str, check: bool = True, timeout: int = 1200):
    """Run the repository's workflow in ``workdir`` with ``configfile`` replacing the paper config."""
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(configfile), "--replace-workflow-config", "--cores", "2",
        "--workflow-profile", "none", "--rerun-incomplete", "--show-failed-logs", *extra,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", ANOREFINER_NO_PROGRESS="1")
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One complete local run of the tiny pipeline, shared by the workflow tests."""
    if shutil.which("dot") is None:
        pass  # graphviz is not needed; only noted for --dag users
    workdir = tmp_path_factory.mktemp("tiny_workflow")
    cfg = write_config(workdir)
    proc = snakemake(workdir, cfg)
    return workdir, cfg, proc
