"""The test images SeaS learnt from are not scored: the refined store lists them, the metrics stage drops them."""

from __future__ import annotations

import numpy as np
import pytest

from anorefiner import stages
from anorefiner.data.index import index_category
from anorefiner.metrics import EvalConfig
from anorefiner.metrics.evaluate import evaluate_category
from anorefiner.refine.store import Refined, write_refined
from anorefiner.seas.data import select_training_set


def _store(path, ids, excluded):
    gen = np.random.default_rng(0)
    n = len(ids)
    # float16-exact values: the store keeps maps in float16
    maps = {m: gen.random((n, 16, 16)).astype(np.float16).astype(np.float32) for m in ("coarse", "ard", "combined")}
    scores = {m: maps[m].reshape(n, -1).max(1) for m in maps}
    attrs = {"excluded_from_scoring": excluded} if excluded is not None else {}
    write_refined(path, Refined(ids=ids, maps=maps, scores=scores, groups=np.zeros(n, np.int64), attrs=attrs))
    return maps, scores


def test_metrics_leave_out_the_images_seas_learnt_from(demo_dataset, tmp_path):
    frame = index_category(demo_dataset, "widget", dataset="demo", split="test")
    ids = list(frame["image_id"])
    trained_on = select_training_set(demo_dataset, "widget", "demo").anomaly_ids
    maps, scores = _store(tmp_path / "seas.h5", ids, trained_on)
    options = EvalConfig(resolution=16, compute_pro=False)
    rows = stages.evaluate(demo_dataset, "demo", "widget", tmp_path / "seas.h5", options)
    keep = np.asarray([i not in set(trained_on) for i in ids])
    masks, labels = stages.ground_truth(demo_dataset, "demo", "widget", [i for i, k in zip(ids, keep) if k])
    expected = evaluate_category({m: (maps[m][keep], scores[m][keep]) for m in maps}, masks, labels, options)
    assert rows == expected
    _store(tmp_path / "all.h5", ids, None)  # a store without the list scores every image
    every = stages.evaluate(demo_dataset, "demo", "widget", tmp_path / "all.h5", options)
    assert every != rows


def test_drop_excluded_keeps_order_and_ignores_unknown_ids():
    methods = {"coarse": (np.arange(4)[:, None, None] * np.ones((4, 2, 2)), np.arange(4.0))}
    ids, kept = stages.drop_excluded(["a", "b", "c", "d"], methods, ["b", "zz"], "store")
    assert ids == ["a", "c", "d"] and kept["coarse"][1].tolist() == [0.0, 2.0, 3.0]
    assert stages.drop_excluded(["a"], methods, [], "store") == (["a"], methods)


@pytest.mark.parametrize("method", ["seas"])
def test_refine_needs_the_seas_model(method, tmp_path):
    from anorefiner.refine.pgt import RefinerOptions

    options = RefinerOptions()
    options.synthesis.method = method
    with pytest.raises(ValueError, match="--seas-model"):
        stages.refine(tmp_path, "demo", "widget", tmp_path / "f.h5", tmp_path / "c.h5", backbone=None,
                      backend_name="musc", backend_type="musc", backend_opts={}, options=options, seed=0,
                      out=tmp_path / "out.h5")
