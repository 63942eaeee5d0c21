"""PGT (paper Sec. 3.2, Tables 4, 7, 9) on the small demo dataset with the real backbone and MuSc."""

import numpy as np
import pytest
import torch

from anorefiner.cache import Features
from anorefiner.config import from_dict
from anorefiner.refine.combine import calibrate
from anorefiner.refine.pgt import RefinerOptions, run_pgt, select_pseudo_normals
from anorefiner.refine.trainer import dice_loss, focal_loss, refiner_loss
from anorefiner.refine.store import read_refined, write_refined
from anorefiner.zsad.groups import make_groups
from anorefiner.zsad.store import Coarse

TINY = {
    "ard": {"feat_channels": 16, "anomaly_channels": 8, "aa_channels": 12, "head_channels": 8},
    "pgt": {"group_size": 6, "n_pseudo_normal": 2, "n_anomalies_per_normal": 2, "epochs": 2, "batch_size": 2,
            "calibration": "none"},  # the default "isotonic" has its own test (test_calibration_...)
}


@pytest.fixture(scope="module")
def category(demo_dataset):
    """Features (EfficientNet-Lite0, random weights: no download, 64 px) and MuSc coarse maps of 'tiles'."""
    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import index_category, load_image
    from anorefiner.zsad import get_backend

    df = index_category(demo_dataset, "tiles", dataset="demo", split="test")
    backbone = build_backbone("efficientnet_lite0", 64, pretrained=None, seed=0)
    images = [load_image(p) for p in df.image_path]
    layers, _ = backbone.forward(backbone.preprocess(images))
    feats = Features(ids=list(df.image_id), layers={k: v.numpy() for k, v in layers.items()})
    backend = get_backend("musc", {"rscin": False, "device": "cpu"})
    res = backend.coarse(feats)
    coarse = Coarse(ids=list(df.image_id), maps=res.maps, scores=res.scores)
    return dict(feats=feats, coarse=coarse, images=images, backbone=backbone, backend=backend,
                labels=df.label.to_numpy())


def _textures():
    gen = np.random.default_rng(0)
    return [gen.integers(0, 255, size=(32, 32, 3), dtype=np.uint8) for _ in range(3)]


def _run(category, seed=0, labels=None, **overrides):
    opts = {k: dict(v) for k, v in TINY.items()}
    for section, values in overrides.items():
        opts.setdefault(section, {}).update(values)
    options = from_dict(RefinerOptions, opts)
    c = category
    return run_pgt(c["feats"], c["coarse"], c["images"], c["backbone"], c["backend"], options, seed=seed,
                   textures=_textures(), eval_resolution=32, labels=labels)


def _expected(ref, coarse_n, ard):
    """The combined map by the run's rule (pgt.combine; refine/combine.py), written out independently."""
    rule = ref.attrs["options"]["pgt"]["combine"]
    return 0.5 * (coarse_n + ard) if rule == "mean" else np.where(coarse_n >= 0, 0.5 * coarse_n * (1.0 + ard), coarse_n)


def _slow_focal(logits, target, gamma=2.0):
    """Binary focal loss, one pixel at a time in float64."""
    total, n = 0.0, 0
    for z, t in zip(logits.double().flatten().tolist(), target.double().flatten().tolist()):
        p = 1.0 / (1.0 + np.exp(-z))
        pt = p if t == 1 else 1.0 - p
        total += -((1.0 - pt) ** gamma) * np.log(pt)
        n += 1
    return total / n


def test_focal_and_combined_losses_match_slow_references():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 5, 5, generator=gen) * 3
    target = (torch.rand(3, 1, 5, 5, generator=gen) > 0.7).float()
    assert float(focal_loss(logits, target)) == pytest.approx(_slow_focal(logits, target), rel=1e-5)
    bce = float(np.mean([-(t * np.log(1 / (1 + np.exp(-z))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-z))))
                         for z, t in zip(logits.double().flatten().tolist(), target.flatten().tolist())]))
    dice = float(dice_loss(logits, target))
    assert float(refiner_loss(logits, target, "dice")) == pytest.approx(dice)
    assert float(refiner_loss(logits, target, "dice_bce")) == pytest.approx(dice + bce, rel=1e-5)
    assert float(refiner_loss(logits, target, "dice_focal")) == pytest.approx(dice + _slow_focal(logits, target),
                                                                              rel=1e-5)
    with pytest.raises(ValueError, match="pgt.loss"):
        refiner_loss(logits, target, "l2")


def test_dice_loss():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:5, 2:5] = 1
    perfect = torch.where(target > 0, 50.0, -50.0)
    assert float(dice_loss(perfect, target)) < 1e-3
    assert float(dice_loss(-perfect, target)) > 0.9


def test_outputs_and_group_one_keeps_the_coarse_map(category):
    ref = _run(category, pgt={"coarse_norm": "running_minmax", "first_group_ard": "coarse"})
    n = len(category["feats"].ids)
    assert set(ref.maps) == {"coarse", "ard", "combined"}
    for m in ref.maps.values():
        assert m.shape == (n, 32, 32) and np.isfinite(m).all()
    expected = np.zeros(n, int)
    expected[make_groups(n, 6, seed=0)[1]] = 1  # default group_order "shuffled": seeded permutation
    assert np.array_equal(ref.groups, expected) and not np.array_equal(ref.groups, np.repeat([0, 1], 6))
    index = _run(category, pgt={"group_order": "index", "epochs": 1})
    assert np.array_equal(index.groups, np.repeat([0, 1], 6))
    g1 = ref.groups == 0
    assert np.allclose(ref.maps["combined"][g1], ref.maps["ard"][g1])  # ARD output of group 1 = normalised coarse
    coarse_n = _normalised(ref, category["coarse"].maps)
    assert np.allclose(ref.maps["combined"][~g1], _expected(ref, coarse_n[~g1], ref.maps["ard"][~g1]), atol=1e-5)
    assert not np.allclose(ref.maps["ard"][~g1], _normalised(ref, category["coarse"].maps)[~g1])  # group 2 really refined
    assert np.array_equal(ref.scores["coarse"], category["coarse"].scores)
    assert np.allclose(ref.scores["combined"], ref.maps["combined"].reshape(n, -1).max(1))


def _normalised(ref, patch_maps):
    """Running min-max of the patch-level maps: group 1 its own range, group 2 the range of groups 1-2."""
    out = ref.maps["coarse"].copy()
    g1 = ref.groups == 0
    lo1, hi1 = patch_maps[g1].min(), patch_maps[g1].max()
    lo, hi = patch_maps.min(), patch_maps.max()
    assert np.isclose(ref.attrs["coarse_norm"]["lo"], lo) and np.isclose(ref.attrs["coarse_norm"]["hi"], hi)
    out[g1] = (out[g1] - lo1) / (hi1 - lo1)
    out[~g1] = (out[~g1] - lo) / (hi - lo)
    return out


def test_first_group_norm_is_frozen_after_group_one(category):
    ref = _run(category)  # default coarse_norm "first_group"
    g1 = ref.groups == 0
    patch = category["coarse"].maps
    lo, hi = patch[g1].min(), patch[g1].max()
    assert patch.min() < lo or patch.max() > hi  # group 2 falls outside group 1's range: the freeze is visible
    assert np.isclose(ref.attrs["coarse_norm"]["lo"], lo) and np.isclose(ref.attrs["coarse_norm"]["hi"], hi)
    expected = (ref.maps["coarse"] - lo) / (hi - lo)
    assert np.allclose(ref.maps["combined"], _expected(ref, expected, ref.maps["ard"]), atol=1e-5)


def test_first_group_ard_zeros(category):
    ref = _run(category, pgt={"epochs": 1, "first_group_ard": "zeros"})
    g1 = ref.groups == 0
    assert np.all(ref.maps["ard"][g1] == 0)
    assert ref.attrs["n_refined_by_ard"] == int((~g1).sum())
    lo, hi = category["coarse"].maps[g1].min(), category["coarse"].maps[g1].max()
    assert np.allclose(ref.maps["combined"][g1], 0.5 * (ref.maps["coarse"][g1] - lo) / (hi - lo), atol=1e-6)


def test_first_group_ard_self_refines_group_one_with_its_own_ard(category):
    ref = _run(category, pgt={"epochs": 1, "first_group_ard": "self"})
    g1 = ref.groups == 0
    assert ref.maps["ard"][g1].std() > 0 and np.all(ref.maps["ard"][g1] > 0)  # sigmoid outputs, not a stand-in
    assert ref.attrs["n_refined_by_ard"] == len(ref.ids)
    lo, hi = category["coarse"].maps[g1].min(), category["coarse"].maps[g1].max()
    coarse_n = (ref.maps["coarse"][g1] - lo) / (hi - lo)
    assert np.allclose(ref.maps["combined"][g1], _expected(ref, coarse_n, ref.maps["ard"][g1]), atol=1e-5)
    zeros = _run(category, pgt={"epochs": 1, "first_group_ard": "zeros"})
    assert RefinerOptions().pgt.first_group_ard == "self"  # the default
    # group 1's ARD is the one trained on group 1; group 2 sees the same ARD in both runs
    assert np.allclose(ref.maps["ard"][~g1], zeros.maps["ard"][~g1], atol=1e-5)


def test_topk_image_score_is_the_mean_of_the_highest_pixels(category):
    ref = _run(category, pgt={"epochs": 1, "image_score": "topk", "image_topk": 0.05})
    n = len(ref.ids)
    for m in ("ard", "combined"):
        flat = ref.maps[m].reshape(n, -1).astype(np.float64)
        k = int(round(0.05 * flat.shape[1]))
        slow = [sorted(row.tolist(), reverse=True)[:k] for row in flat]
        assert np.allclose(ref.scores[m], [sum(r) / k for r in slow], atol=1e-6)
    with pytest.raises(ValueError, match="image_topk"):
        _run(category, pgt={"image_score": "topk", "image_topk": 0.0})


def test_short_run_lowers_the_dice_loss(category):
    ref = _run(category, pgt={"epochs": 12, "lr": 0.01, "group_size": 12, "train_last_group": True})
    history = ref.attrs["loss_history"][0]
    assert len(history) == 12
    assert np.mean(history[-3:]) < np.mean(history[:3])


def test_same_seed_same_maps_on_cpu(category):
    a, b, c = _run(category, seed=5), _run(category, seed=5), _run(category, seed=6)
    for m in a.maps:
        assert np.array_equal(a.maps[m], b.maps[m])
    assert not np.array_equal(a.maps["ard"], c.maps["ard"])


@pytest.mark.parametrize("schedule", ["one_group", "same_anomalies", "same_normals"])
def test_schedules_run(category, schedule):
    ref = _run(category, pgt={"schedule": schedule, "group_size": 4, "epochs": 1})
    assert ref.groups.max() == 2
    trained_groups = len(ref.attrs["loss_history"])
    assert trained_groups == (1 if schedule == "one_group" else 2)


class _Untouchable:
    """Labels that fail when read: PGT must not look at them unless the contamination ablation asks."""

    def __getitem__(self, i):
        raise AssertionError("ground-truth labels were read")

    def __len__(self):
        raise AssertionError("ground-truth labels were read")

    def __array__(self, *a, **k):
        raise AssertionError("ground-truth labels were read")


def test_labels_are_read_only_for_contamination(category):
    ref = _run(category, labels=_Untouchable())
    assert ref.attrs["labels_used"] is False
    with pytest.raises(AssertionError, match="labels were read"):
        _run(category, labels=_Untouchable(), pgt={"contamination_ratio": 0.5})
    with pytest.raises(ValueError, match="labels"):
        _run(category, pgt={"contamination_ratio": 0.5})


def test_contamination_forces_anomalous_pseudo_normals(category):
    maps, labels = category["coarse"].maps, category["labels"]
    group = np.arange(len(labels))
    clean = select_pseudo_normals(maps, group, 4)
    forced = select_pseudo_normals(maps, group, 4, contamination_ratio=0.5, labels=labels,
                                   gen=np.random.default_rng(0))
    assert len(clean) == len(forced) == 4
    assert labels[forced].sum() >= 2
    scores = maps.reshape(len(maps), -1).max(1)
    assert set(clean) == set(np.argsort(scores, kind="stable")[:4])


def test_store_round_trip(tmp_path, category):
    ref = _run(category, pgt={"epochs": 1})
    path = write_refined(tmp_path / "r.h5", ref)
    back = read_refined(path)
    assert back.ids == ref.ids and np.array_equal(back.groups, ref.groups)
    for m in ref.maps:
        assert np.allclose(back.maps[m], ref.maps[m], atol=2e-3)
        assert np.array_equal(back.scores[m], ref.scores[m].astype(np.float32))
    assert back.attrs["seed"] == 0 and back.attrs["options"]["pgt"]["epochs"] == 1
    assert not list(tmp_path.glob(".*tmp"))
    # one pseudo-anomaly per trained group, with the maps the ARD gave it (benchmarks/refine_gain.py draws them)
    assert sorted(back.diagnostics) == ["group1"]
    d = back.diagnostics["group1"]
    assert d["image"].dtype == np.uint8 and d["image"].shape == (64, 64, 3) and d["mask"].shape == (64, 64)
    c, a = d["coarse"].astype(np.float32), d["ard"].astype(np.float32)
    assert d["mask"].any() and np.allclose(d["combined"], _expected(back, c, a), atol=2e-3)


def _trained_group_one(category, **pgt):
    """A Trainer after training on group 1's pseudo-anomalies (short, large steps: BN statistics still moving)."""
    from anorefiner.refine.trainer import CoarseNorm, Trainer

    opts = {k: dict(v) for k, v in TINY.items()}
    opts["pgt"].update({"epochs": 10, "lr": 0.05, **pgt})
    options = from_dict(RefinerOptions, opts)
    c = category
    trainer = Trainer(c["feats"], c["coarse"], c["images"], c["backbone"], c["backend"], options, 0, _textures(),
                       torch.device("cpu"))
    group = make_groups(len(c["feats"].ids), 6, seed=0)[0]
    norm = CoarseNorm("first_group")
    norm.update(c["coarse"].maps[group])
    normals = select_pseudo_normals(c["coarse"].maps, group, 2)
    data = trainer.make_training_set(normals, group, stream=0)
    trainer.train(data, norm, stream=0)
    return trainer, data, norm


def test_eval_mode_loss_equals_train_mode_loss_on_the_training_set(category):
    """Issue 26: the ARD must be evaluated with BN statistics that match its final weights."""
    trainer, data, norm = _trained_group_one(category)
    fit = trainer.check_fit(data, norm)  # recalibrates BN (bn_recalibrate, the default)
    assert fit["eval_mode"] == pytest.approx(fit["train_mode"], abs=0.004)
    # without recalibration the running averages lag the weights (measured 0.017 here, 0.24 on transistor)
    stale_gap = abs(fit["eval_mode_stale_bn"] - fit["train_mode"])
    assert stale_gap > 0.008 and stale_gap > 4 * abs(fit["eval_mode"] - fit["train_mode"])
    # checking the fit changes no weight and leaves the model in eval mode
    assert not trainer.model.training
    assert trainer.loss_on(data, norm, train_mode=False) == pytest.approx(fit["eval_mode"])


def test_bn_recalibration_can_be_switched_off(category):
    trainer, data, norm = _trained_group_one(category, bn_recalibrate=False)
    fit = trainer.check_fit(data, norm)
    assert "eval_mode_stale_bn" not in fit
    ref = _run(category, pgt={"epochs": 1})
    assert [f["group"] for f in ref.attrs["fit"]] == [1]  # group 1 (self) trains; the last group does not
    assert set(ref.attrs["fit"][0]) == {"group", "train_mode", "eval_mode", "eval_mode_stale_bn",
                                        "pseudo_coarse_median_in_mask", "pseudo_coarse_median_outside"}
    assert ref.attrs["fit"][0]["pseudo_coarse_median_in_mask"] > ref.attrs["fit"][0]["pseudo_coarse_median_outside"]


def test_safeguard_keeps_the_coarse_map_of_groups_the_ard_does_not_improve(category):
    off = _run(category, pgt={"epochs": 1})
    always = _run(category, pgt={"epochs": 1, "safeguard": True, "safeguard_margin": -1.0})
    never = _run(category, pgt={"epochs": 1, "safeguard": True, "safeguard_margin": 1.0})
    # the held-back pseudo-anomalies come from their own stream: the training, so the ARD, is unchanged
    for m in off.maps:
        assert np.array_equal(always.maps[m], off.maps[m])
    assert np.array_equal(never.maps["ard"], off.maps["ard"])  # the ARD's own map is still stored
    assert [v["refined"] for v in always.attrs["safeguard"]] == [True, True]  # group 1 (self), group 2
    assert [v["refined"] for v in never.attrs["safeguard"]] == [False, False]
    assert never.attrs["n_refined_by_ard"] == 0
    g1 = never.groups == 0
    lo, hi = category["coarse"].maps[g1].min(), category["coarse"].maps[g1].max()
    assert np.allclose(never.maps["combined"], _expected(never, (never.maps["coarse"] - lo) / (hi - lo), 0.0), atol=1e-5)
    for v in always.attrs["safeguard"]:
        assert v["n_holdout"] == 2 * 1 and v["n_normals"] == 2  # r pseudo-normals x safeguard_holdout
        assert 0 <= v["ap_coarse"] <= 1 and 0 <= v["ap_combined"] <= 1


def test_safeguard_decision_follows_the_pixel_ap_on_its_check_set(category):
    ref = _run(category, pgt={"epochs": 1, "safeguard": True})
    for v in ref.attrs["safeguard"]:
        assert v["refined"] == (v["ap_combined"] > v["ap_coarse"])
        g = ref.groups == v["group"] - 1
        lo, hi = ref.attrs["coarse_norm"]["lo"], ref.attrs["coarse_norm"]["hi"]
        coarse_n = (ref.maps["coarse"][g] - lo) / (hi - lo)
        expected = _expected(ref, coarse_n, ref.maps["ard"][g] if v["refined"] else 0.0)
        assert np.allclose(ref.maps["combined"][g], expected, atol=1e-5)


def test_coarse_half_of_combined_can_be_pixel_centred(category):
    ref = _run(category, pgt={"epochs": 1, "coarse_align_corners": False})
    import torch.nn.functional as F

    raw = torch.as_tensor(category["coarse"].maps)[:, None].float()
    centred = F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False)[:, 0].numpy()
    corner = F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=True)[:, 0].numpy()
    assert np.allclose(ref.maps["coarse"], corner, atol=1e-6)  # the "coarse" output: always the backend's
    lo, hi = ref.attrs["coarse_norm"]["lo"], ref.attrs["coarse_norm"]["hi"]
    assert np.allclose(ref.maps["combined"], _expected(ref, (centred - lo) / (hi - lo), ref.maps["ard"]), atol=1e-5)


def test_pseudo_anomalies_are_scored_against_the_backends_own_references(category):
    from anorefiner.refine.pgt import _references

    n = len(category["feats"].ids)
    groups = make_groups(n, 6, seed=0)
    # MuSc scored every real image against all others: so are the pseudo-anomalies (default "backend")
    assert RefinerOptions().pgt.query_references == "backend"
    assert np.array_equal(_references(groups, 1, "backend", n, category["backend"], groups[1][:2]), np.arange(n))
    # a backend that names no references: the current group, as before
    assert np.array_equal(_references(groups, 1, "backend", n, object(), groups[1][:2]), groups[1])
    assert np.array_equal(_references(groups, 1, "group", n, category["backend"], groups[1][:2]), groups[1])


@pytest.mark.parametrize("first", ["self", "coarse"])
def test_combine_rules_share_the_ard_and_differ_only_in_the_final_map(category, first):
    gate = _run(category, pgt={"epochs": 1, "first_group_ard": first})
    mean = _run(category, pgt={"epochs": 1, "first_group_ard": first, "combine": "mean"})
    assert RefinerOptions().pgt.combine == "gate"  # the default (docs/refiner_audit.md)
    assert np.array_equal(gate.maps["ard"], mean.maps["ard"])  # training does not read the rule
    lo, hi = gate.attrs["coarse_norm"]["lo"], gate.attrs["coarse_norm"]["hi"]
    coarse_n = (gate.maps["coarse"] - lo) / (hi - lo)
    refined = np.ones(len(gate.ids), bool) if first == "self" else gate.groups != 0
    a = gate.maps["ard"][refined]
    assert np.allclose(mean.maps["combined"][refined], 0.5 * (coarse_n[refined] + a), atol=1e-5)
    c = coarse_n[refined]
    assert (c < 0).any()  # group 2 has pixels below group 1's frozen floor
    assert np.allclose(gate.maps["combined"][refined], np.where(c >= 0, 0.5 * c * (1 + a), c), atol=1e-5)
    # under the gate the ARD can lower a coarse score (to half where it says 0) but never raise it
    assert np.all(gate.maps["combined"][refined] <= c + 1e-6)
    assert np.all(gate.maps["combined"][refined] >= np.minimum(0.5 * c, c) - 1e-6)
    if first == "coarse":  # the paper's group 1: its coarse map itself, under either rule
        g1 = gate.groups == 0
        assert np.allclose(gate.maps["combined"][g1], coarse_n[g1], atol=1e-5)
        assert np.allclose(mean.maps["combined"][g1], coarse_n[g1], atol=1e-5)


def test_calibration_changes_only_the_combined_map(category):
    plain = _run(category, pgt={"epochs": 1})
    iso = _run(category, pgt={"epochs": 1, "calibration": "isotonic"})
    assert RefinerOptions().pgt.calibration == "isotonic"  # the default (docs/refiner_audit.md)
    assert np.array_equal(plain.maps["ard"], iso.maps["ard"])  # the stored ARD output stays uncalibrated
    lo, hi = iso.attrs["coarse_norm"]["lo"], iso.attrs["coarse_norm"]["hi"]
    coarse_n = (iso.maps["coarse"] - lo) / (hi - lo)
    for k in np.unique(iso.groups):
        g = iso.groups == k
        expected = _expected(iso, coarse_n[g], calibrate(coarse_n[g], iso.maps["ard"][g], "isotonic"))
        assert np.allclose(iso.maps["combined"][g], expected, atol=1e-5)
    assert not np.allclose(iso.maps["combined"], plain.maps["combined"])


def test_groups_no_ard_refines_sit_on_the_calibrated_groups_scale(category):
    # under calibration a refined group's ARD is never 0 (isotonic: E[coarse_n | ARD], at least ~0.2 on transistor),
    # so a group kept coarse (safeguard) or group 1 under "zeros" gets the calibrated map of an ARD that says
    # nothing (isotonic: the group's mean coarse_n), not combine(coarse_n, 0) = coarse_n/2, which sat below every
    # refined group (one kept group cost 1-7 points of pooled pixel AP on the stored bottle/transistor runs)
    zeros = _run(category, pgt={"epochs": 1, "first_group_ard": "zeros", "calibration": "isotonic"})
    never = _run(category, pgt={"epochs": 1, "safeguard": True, "safeguard_margin": 1.0, "calibration": "isotonic"})
    lo, hi = zeros.attrs["coarse_norm"]["lo"], zeros.attrs["coarse_norm"]["hi"]
    coarse_n = (zeros.maps["coarse"] - lo) / (hi - lo)
    for ref, unrefined in ((zeros, [0]), (never, [0, 1])):
        for k in unrefined:
            g = ref.groups == k
            assert np.allclose(ref.maps["combined"][g], _expected(ref, coarse_n[g], coarse_n[g].mean()), atol=1e-4)


def test_safeguard_check_calibrates_the_ard_with_the_map_fitted_on_the_group(category):
    # the check set (pseudo-anomalies the coarse map finds, pseudo-normals) gets the calibration the group's real
    # images were fitted with, not one of its own: an ARD mapped to a constant leaves the coarse ranking (gate and
    # mean), so combined ties coarse exactly; the ARD as it is does not
    from anorefiner.refine import safeguard
    from anorefiner.refine.trainer import CoarseNorm, Trainer

    c = category
    options = from_dict(RefinerOptions, {k: dict(v) for k, v in TINY.items()})
    trainer = Trainer(c["feats"], c["coarse"], c["images"], c["backbone"], c["backend"], options, 0, _textures(),
                      torch.device("cpu"))
    g = np.arange(6)
    norm = CoarseNorm("first_group")
    norm.update(c["coarse"].maps[g])
    normals = select_pseudo_normals(c["coarse"].maps, g, 2)
    holdout = trainer.make_pseudo_anomalies(normals, g, 2, (0, "safeguard"))
    flat = safeguard.check(trainer, holdout, normals, norm, lambda a: np.full_like(a, 0.3))
    assert flat["ap_combined"] == pytest.approx(flat["ap_coarse"], abs=1e-12)
    raw = safeguard.check(trainer, holdout, normals, norm)
    assert raw["ap_coarse"] == flat["ap_coarse"]
    assert raw["ap_combined"] != pytest.approx(raw["ap_coarse"], abs=1e-6)


def test_a_diverged_ard_fails_naming_its_group(category):
    # group 1 is refined by its own ARD (first_group_ard: self); before, sklearn's isotonic fit failed on the NaN
    with pytest.raises(FloatingPointError, match=r"group 1 .*pgt\.lr=1e\+30"):
        _run(category, pgt={"epochs": 1, "lr": 1e30, "calibration": "isotonic"})
