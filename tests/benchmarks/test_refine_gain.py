"""benchmarks/refine_gain.py on the tiny demo data: per-category gain, per-group verdicts, the diagnostic figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.unit.refine.test_pgt import _run, category  # noqa: F401 (the tiny PGT run and its fixture)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "refine_gain.py"
TINY = {"ard": {"feat_channels": 16, "anomaly_channels": 8, "aa_channels": 12, "head_channels": 8,
                "ar_channels": [16, 8]},
        "pgt": {"group_size": 6, "n_pseudo_normal": 2, "n_anomalies_per_normal": 2, "epochs": 2, "batch_size": 2}}


def test_refine_gain_reports_gain_groups_and_figures(tmp_path, demo_dataset):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", ANOREFINER_NO_PROGRESS="1")
    cmd = [sys.executable, str(SCRIPT), "--data-root", str(demo_dataset), "--dataset", "demo", "--categories", "tiles",
           "--seeds", "0", "1", "--resolution", "64", "--eval-resolution", "32", "--no-pro", "--out", str(out),
           "--options", json.dumps(TINY), "--variant", 'never={"pgt": {"safeguard": true, "safeguard_margin": 1.0}}']
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert summary.strip() in proc.stdout  # printed and written
    assert "gain combined − coarse" in summary and "per PGT group" in summary
    # the safeguard is off by default ("off" in the table); "never" (margin 1.0) lets no ARD refine, and the map
    # without the safeguard is rebuilt from the stored ARD maps
    assert "| tiles / offline / never | 1 |" in summary and "| 0/2 |" in summary and "| off |" in summary
    assert "| unguarded |" in summary
    rows = pd.read_csv(out / "results.csv")
    assert {"all", "group1", "group2"} <= set(rows.subset)
    # nothing refined: per group combined is a monotone map of the coarse map (0.5·coarse_n uncalibrated; under the
    # default isotonic calibration coarse_n·(1 + the group's mean coarse_n)/2): per group the same pixel AP up to
    # the store's float16 rounding (measured 2e-4); an ARD moves it by far more. Pooled over groups the factors
    # differ a little (real bottle/transistor runs: 0.04 points)
    for group in ("group1", "group2"):
        never = rows[(rows.variant == "never") & (rows.subset == group) & (rows.metric == "pixel_ap")]
        by_method = never.groupby("method").value.mean()
        assert abs(by_method["combined"] - by_method["coarse"]) < 2e-3, group
    for variant in ("default", "never"):
        for seed in (0, 1):
            png = out / "tiles" / "offline" / variant / f"seed{seed}" / "groups.png"
            assert png.is_file() and png.stat().st_size > 10_000
    # musc_cnn's maps do not depend on the seed: every seed refines the one seed-0 coarse store
    from anorefiner.stages import stored_provenance

    assert stored_provenance(out / "tiles" / "offline" / "default" / "seed1" / "refined.h5")["coarse"]["seed"] == 0
    assert not list((out / "tiles").glob("coarse_seed*.h5"))


def test_a_seed_dependent_backend_refines_the_coarse_maps_of_the_run_seed(tmp_path, demo_dataset):
    """MuSc* draws its groups with the seed (as PGT does): run seed 1 must refine seed-1 maps, with the backend that
    scores the pseudo-anomalies built with seed 1 too (it used the seed-0 store for every seed)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import refine_gain
    from anorefiner.stages import stored_provenance

    out = tmp_path / "out"
    opts = {"ard": TINY["ard"], "pgt": {**TINY["pgt"], "epochs": 1}}
    assert refine_gain.main(["--data-root", str(demo_dataset), "--dataset", "demo", "--categories", "tiles",
                             "--backend", "musc_star", "--seeds", "1", "--resolution", "64", "--eval-resolution", "32",
                             "--no-pro", "--no-figures", "--out", str(out), "--options", json.dumps(opts)]) == 0
    refined = stored_provenance(out / "tiles" / "offline" / "default" / "seed1" / "refined.h5")
    assert refined["coarse"]["seed"] == 1 and refined["coarse"]["backend"] == "musc_star"
    assert stored_provenance(out / "tiles" / "coarse_seed1.h5")["seed"] == 1


@pytest.mark.parametrize("pgt", [{}, {"first_group_ard": "coarse"}, {"first_group_ard": "zeros"},
                                 {"coarse_norm": "running_minmax"}, {"coarse_norm": "group_minmax"},
                                 {"coarse_norm": "none", "combine": "mean", "calibration": "none"},
                                 {"calibration": "quantile"}])
def test_rebuilt_equals_the_combined_map_pgt_made(category, pgt):
    """refine_gain.rebuilt (refine_derived's every rule, refine_gain's 'unguarded') redoes PGT's combination from
    a run's stored maps: under the run's own rule it gives the run's combined map, for every group-1 rule and
    coarse scale (it used the last scale for every group, and combined group 1's coarse stand-in with itself)."""
    sys.path.insert(0, str(SCRIPT.parent))
    from refine_gain import rebuilt

    ref = _run(category, pgt={"epochs": 1, "calibration": "isotonic", **pgt})
    assert np.abs(rebuilt(ref) - ref.maps["combined"]).max() < 1e-6


def test_stores_reused_from_other_code_are_named_and_two_dtd_roots_refused(tmp_path, demo_dataset):
    """A store is reused when its settings match whatever code made it: the rows carry the commit that made each
    store, and the summary opens with those other code made (numbers from before a fix cannot pass as the fix's)."""
    import h5py

    sys.path.insert(0, str(SCRIPT.parent))
    import refine_gain
    from anorefiner.provenance import code_label, code_version

    out = tmp_path / "out"
    opts = {"ard": TINY["ard"], "pgt": {**TINY["pgt"], "epochs": 1}}
    argv = ["--data-root", str(demo_dataset), "--dataset", "demo", "--categories", "tiles", "--seeds", "0",
            "--resolution", "64", "--eval-resolution", "32", "--no-pro", "--no-figures", "--out", str(out),
            "--options", json.dumps(opts)]
    assert refine_gain.main(argv) == 0
    assert set(pd.read_csv(out / "results.csv").code) == {code_label(code_version())}
    assert "other code" not in (out / "summary.md").read_text()
    store = out / "tiles" / "offline" / "default" / "seed0" / "refined.h5"
    with h5py.File(store, "r+") as f:
        run = json.loads(f.attrs["run"])
        run["code"] = {"version": "0", "commit": "f" * 40, "dirty": False}
        f.attrs["run"] = json.dumps(run)
    assert refine_gain.main(argv) == 0  # same settings: reused
    assert set(pd.read_csv(out / "results.csv").code) == {"f" * 40}
    summary = (out / "summary.md").read_text()
    assert summary.startswith("**1 of the refined stores were reused from other code") and f"{store} (made by {'f' * 40})" in summary
    with pytest.raises(SystemExit, match="two sources would share"):
        refine_gain.main(argv + ["--textures", "offline", str(tmp_path / "dtd1"), str(tmp_path / "dtd2")])
