"""Groups of small categories: never a single group that leaves PGT nothing to refine (issue 18, item 3)."""

import json
import logging

import numpy as np
import pytest

from anorefiner.cli import main as cli
from anorefiner.refine.store import read_refined
from anorefiner.zsad.groups import make_groups, n_groups


def test_paper_categories_keep_ceil_n_over_u():
    assert [len(g) for g in make_groups(42, 30)] == [21, 21]  # toothbrush
    assert [len(g) for g in make_groups(83, 30)] == [28, 28, 27]  # bottle
    assert n_groups(60, 30) == 2 and n_groups(61, 30) == 3
    assert len(make_groups(200, None)) == 1  # MuSc on the whole test set


@pytest.mark.parametrize("n, sizes", [(10, [5, 5]), (30, [15, 15]), (3, [2, 1]), (2, [1, 1]), (1, [1])])
def test_small_categories_get_two_groups(n, sizes):
    assert [len(g) for g in make_groups(n, 30)] == sizes
    shuffled = make_groups(n, 30, seed=4)
    assert sorted(np.concatenate(shuffled).tolist()) == list(range(n))
    assert [len(g) for g in shuffled] == sizes
    assert len(make_groups(n, 30, min_groups=1)) == 1  # the plain ceil(N/u) rule stays available


def test_musc_star_and_pgt_share_the_small_category_groups():
    """Both call make_groups with (n, u, seed): MuSc* scores exactly the groups PGT refines."""
    from anorefiner.zsad import get_backend

    backend = get_backend("musc_star", {"group_size": 30}, seed=7)
    assert [g.tolist() for g in backend.groups(10)] == [g.tolist() for g in make_groups(10, 30, seed=7)]
    assert len(backend.groups(10)) == 2


RUN = ["--category", "tiles", "--dataset", "demo", "--resolution", "64", "--eval-resolution", "32",
       "--backend-options", '{"rscin": false}', "--no-pro", "--device", "cpu"]
SMALL_ARD = {"feat_channels": 16, "anomaly_channels": 8, "aa_channels": 12, "head_channels": 8}


def test_category_smaller_than_u_is_refined(demo_dataset, tmp_path):
    """12 test images, u = 30 (the default): group 1 trains the ARD, which refines group 2 (and, with the default
    first_group_ard "self", group 1 too)."""
    options = {"ard": SMALL_ARD, "pgt": {"n_pseudo_normal": 2, "n_anomalies_per_normal": 2, "epochs": 2}}
    out = tmp_path / "run"
    assert cli(["run", "--data-root", str(demo_dataset), *RUN, "--options", json.dumps(options),
                "--out", str(out)]) == 0
    refined = read_refined(out / "refined.h5")
    assert refined.attrs["n_groups"] == 2 and refined.attrs["options"]["pgt"]["group_size"] == 30
    second = refined.groups == 1
    assert second.sum() == 6 and refined.attrs["n_refined_by_ard"] == 12
    assert np.abs(refined.maps["ard"][second]).max() > 0  # the trained ARD's maps, not zeros
    assert not np.allclose(refined.maps["combined"][second], refined.maps["coarse"][second] / 2, atol=1e-3)


def test_unrefined_store_is_reported_loudly(demo_dataset, tmp_path, caplog):
    options = {"ard": SMALL_ARD, "pgt": {"epochs": 0}}
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="anorefiner"):
        assert cli(["run", "--data-root", str(demo_dataset), *RUN, "--options", json.dumps(options),
                    "--out", str(out)]) == 0
    assert read_refined(out / "refined.h5").attrs["n_refined_by_ard"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("NOT REFINED: demo/tiles") for m in warnings)  # at PGT
    assert any("refined.h5 holds no image refined by a trained ARD" in m for m in warnings)  # at metrics
