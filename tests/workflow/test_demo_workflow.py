"""The real workflow end to end on a tiny demo: every stage runs, outputs are complete and sane."""

from __future__ import annotations

import h5py
import pandas as pd

from .conftest import REPO, snakemake, write_config


def test_lint_is_clean():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations" in proc.stdout + proc.stderr


def test_tiny_pipeline_produces_every_stage(tiny_run):
    workdir, _, _ = tiny_run
    for cat in ("tiles", "widget"):
        assert (workdir / f"results/features/demo/effnet@64/{cat}.h5").is_file()
        assert (workdir / f"results/coarse/demo/musc_star/{cat}/seed0.h5").is_file()
        refined = workdir / f"results/refined/demo/musc_star/default/seed0/{cat}.h5"
        with h5py.File(refined) as f:
            assert set(f["maps"]) == {"coarse", "ard", "combined"}
            assert f["maps/combined"].shape == (12, 64, 64)
        metrics = pd.read_csv(workdir / f"results/metrics/demo/musc_star/default/seed0/{cat}.csv")
        assert set(metrics["method"]) == {"coarse", "ard", "combined"}
        assert metrics["value"].between(0, 1).all(), metrics
    table = pd.read_csv(workdir / "tables/demo_table1.csv")
    assert len(table) > 0
    assert (workdir / "tables/demo_table1.md").is_file()
    assert (workdir / "tables/audit.md").read_text().strip()
    for png in ("qualitative", "bars"):
        path = workdir / f"figures/demo/musc_star/default/seed0/{png}.png"
        assert path.stat().st_size > 10_000


def test_demo_audit_records_commit_config_hash_and_weights_of_every_row(tiny_run):
    """Issue 30: the audit names the code (a 40-character commit), the configuration (a hash) and, for every row
    that ran, its weight source; the table CSV carries them per row."""
    import json
    import re

    workdir, _, _ = tiny_run
    audit = (workdir / "tables/audit.md").read_text()
    section = audit[audit.index("## Provenance"):audit.index("## Gains")]
    assert re.search(r"at commit [0-9a-f]{40}(\+dirty)?$", section, re.M), section
    assert re.search(r"configuration sha256: [0-9a-f]{64} \(the workflow's resolved configuration\)", section)
    assert "coarse: CPU" in section and "refined: CPU" in section and "torch " in section
    table = pd.read_csv(workdir / "tables/demo_table1.csv", keep_default_na=False)
    ran = table[table["n_seeds"] > 0]
    assert set(ran["row"]) == {"MuSc", "MuSc*", "MuSc/+ Ours", "PA-CLIP"}
    for row in ran.drop_duplicates("row").itertuples():
        assert row.weights.startswith(("pretrained backbone efficientnet_lite0", "random weights")), row
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", row.code) and row.provenance_flag == "", row
        assert f"| demo_table1 | MVTec AD | {row.row.replace('*', chr(92) + '*')} | {row.weights} | {row.code} |  |" \
            in section
    block = json.loads((workdir / "tables/demo_table1.provenance.json").read_text())
    assert block["config_sha256"] in section and len(block["rows"]) == 4
    gains = audit[audit.index("## Gains"):]
    assert "| MVTec AD | MuSc/+ Ours | MuSc\\* | AUROC-cls |" in gains and "Verdict: demo_table1: refiner:" in gains
    sidecar = workdir / "results/metrics/demo/musc_star/default/seed0/tiles.provenance.json"
    stages = json.loads(sidecar.read_text())["stages"]
    assert set(stages) == {"coarse", "refined"} and stages["refined"]["weights"] == stages["coarse"]["weights"]


def test_rerun_is_a_no_op(tiny_run):
    workdir, cfg, _ = tiny_run
    proc = snakemake(workdir, cfg, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_unknown_config_key_names_the_key(tmp_path):
    cfg = write_config(tmp_path, datasets={"demo": {"format": "demo", "categories": ["tiles"], "colour": 1}})
    proc = snakemake(tmp_path, cfg, "-n", check=False)
    assert proc.returncode != 0
    assert "colour" in proc.stdout + proc.stderr


def test_unknown_category_is_a_schema_error(tmp_path):
    cfg = write_config(tmp_path, datasets={"demo": {"format": "demo", "categories": ["teapot"]}})
    proc = snakemake(tmp_path, cfg, "-n", check=False)
    assert proc.returncode != 0
    assert "teapot" in proc.stdout + proc.stderr


def test_unknown_dataset_is_a_schema_error(tmp_path):
    cfg = write_config(tmp_path, datasets={"mvtec": {"format": "mvtec"}})
    proc = snakemake(tmp_path, cfg, "-n", check=False)
    assert proc.returncode != 0
    assert "mvtec" in proc.stdout + proc.stderr


def test_html_report_collects_tables_and_figures(tiny_run):
    workdir, cfg, _ = tiny_run
    report = workdir / "report.html"
    snakemake(workdir, cfg, "--report", str(report))
    html = report.read_text(errors="replace")
    assert "demo_table1" in html and "qualitative.png" in html
    assert "demo_table1.md" in html  # the Markdown table too, not only the CSV
    assert "Qualitative results" in html and "Error bars are the" in html  # captions say what each figure shows
