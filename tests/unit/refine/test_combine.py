"""The final map of coarse and ARD (refine/combine.py, paper Sec. 3.2) against a float64 loop."""

import numpy as np
import pytest
import torch

from anorefiner.refine.combine import COMBINE_RULES, calibrate, calibration_map, combine


def _slow(c, a, rule):
    out = np.zeros(c.shape, np.float64)
    for i in np.ndindex(c.shape):
        ci, ai = float(c[i]), float(a[i])
        if rule == "mean":
            out[i] = (ci + ai) / 2.0
        else:
            out[i] = ci * (1.0 + ai) / 2.0 if ci >= 0 else ci
    return out


@pytest.mark.parametrize("rule", COMBINE_RULES)
def test_combine_matches_a_float64_loop_on_numpy_and_torch(rule):
    gen = np.random.default_rng(0)
    c, a = gen.random((3, 5, 7)) * 1.4 - 0.2, gen.random((3, 5, 7))  # coarse_n leaves [0, 1] under a frozen scale
    ref = _slow(c, a, rule)
    assert np.allclose(combine(c, a, rule), ref, atol=1e-12)
    got = combine(torch.as_tensor(c, dtype=torch.float32), torch.as_tensor(a, dtype=torch.float32), rule)
    assert torch.is_tensor(got) and np.allclose(got.numpy(), ref, atol=1e-6)


@pytest.mark.parametrize("rule", COMBINE_RULES)
def test_nothing_refined_is_half_the_coarse_map_under_every_rule(rule):
    c = np.random.default_rng(1).random((2, 4, 4))
    assert np.allclose(combine(c, 0.0, rule), 0.5 * c)


def test_gate_never_raises_a_pixel_above_its_coarse_score_and_mean_can():
    c = np.array([0.1, 0.5, 0.9, -0.1])
    a = np.array([1.0, 0.0, 1.0, 0.0])
    assert np.all(combine(c, a, "gate") <= c)
    assert combine(c, a, "mean")[0] > c[0]  # an ARD false positive on a normal-looking pixel


def test_unknown_rule_names_the_key():
    with pytest.raises(ValueError, match="pgt.combine='max'"):
        combine(np.zeros(2), np.zeros(2), "max")


def test_gate_is_monotone_in_both_arguments_across_zero():
    c = np.linspace(-0.5, 1.2, 35)[:, None]
    a = np.linspace(0, 1, 11)[None, :]
    g = combine(c, a, "gate")
    assert np.all(np.diff(g, axis=0) >= -1e-12) and np.all(np.diff(g, axis=1) >= -1e-12)


def _slow_isotonic(x, y):
    """Pool-adjacent-violators in float64 loops: the non-decreasing fit of y on x (ties in x pooled first)."""
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    blocks = []  # [sum, count, x value]
    for xi, yi in zip(xs, ys):
        if blocks and blocks[-1][2] == xi:
            blocks[-1][0] += yi
            blocks[-1][1] += 1
        else:
            blocks.append([yi, 1, xi])
    merged = []  # [sum, count, [x values]]
    for total, count, xi in blocks:
        merged.append([total, count, [xi]])
        while len(merged) > 1 and merged[-2][0] / merged[-2][1] > merged[-1][0] / merged[-1][1]:
            t, c, xv = merged.pop()
            merged[-1][0] += t
            merged[-1][1] += c
            merged[-1][2] += xv
    fit = {}
    for total, count, xv in merged:
        for xi in xv:
            fit[xi] = total / count
    return np.array([fit[xi] for xi in x])


def test_isotonic_calibration_matches_a_pool_adjacent_violators_loop():
    gen = np.random.default_rng(2)
    ard = np.round(gen.random((2, 6, 6)), 2)  # ties, as sigmoid maps have
    coarse = 0.5 * ard + 0.3 * gen.random((2, 6, 6))
    got = calibrate(coarse, ard, "isotonic")
    assert np.allclose(got.ravel(), _slow_isotonic(ard.ravel(), coarse.ravel()), atol=1e-6)


def test_calibration_keeps_the_ard_ranking_and_takes_the_coarse_scale():
    gen = np.random.default_rng(3)
    ard = gen.random((4, 8, 8)).astype(np.float32)
    coarse = (0.2 + 0.1 * gen.random((4, 8, 8))).astype(np.float32)
    assert calibrate(coarse, ard, "none") is ard
    for mode in ("quantile", "isotonic"):
        out = calibrate(coarse, ard, mode)
        assert out.shape == ard.shape and out.dtype == np.float32
        order = np.argsort(ard.ravel())
        assert np.all(np.diff(out.ravel()[order]) >= -1e-6)  # monotone in the ARD
        assert coarse.min() - 1e-6 <= out.min() and out.max() <= coarse.max() + 1e-6
    q = calibrate(coarse, ard, "quantile")
    assert np.allclose(np.quantile(q, [0.1, 0.5, 0.9]), np.quantile(coarse, [0.1, 0.5, 0.9]), atol=5e-3)
    # an ARD the coarse map does not follow at all becomes nearly flat under isotonic calibration
    flat = calibrate(coarse, ard, "isotonic")
    assert flat.std() < 0.5 * coarse.std()
    with pytest.raises(ValueError, match="pgt.calibration='platt'"):
        calibrate(coarse, ard, "platt")


def test_tied_ard_values_take_the_middle_of_their_coarse_quantiles_not_the_top():
    gen = np.random.default_rng(4)
    coarse = gen.random((3, 8, 8))
    # an ARD that says nothing (a constant map): a central coarse value, as the isotonic fit gives (the mean)
    for mode in ("quantile", "isotonic"):
        flat = calibrate(coarse, np.zeros_like(coarse), mode)
        assert np.ptp(flat) == 0 and abs(float(flat.flat[0]) - coarse.mean()) < 0.02, mode
    # 90 % of the pixels tied at 0 (a saturated sigmoid): they share the middle of the lower 90 % of the coarse
    # quantiles, not its top
    ard = np.where(gen.random(coarse.shape) < 0.9, 0.0, gen.random(coarse.shape))
    tied = calibrate(coarse, ard, "quantile")[ard == 0]
    q = np.linspace(0, 1, 1001)
    lower = np.quantile(coarse.ravel(), q)[q <= (ard == 0).mean()]
    assert np.ptp(tied) == 0 and abs(float(tied[0]) - lower.mean()) < 0.02


@pytest.mark.parametrize("mode", ["quantile", "isotonic"])
def test_calibrated_ard_stays_in_the_ards_range_so_the_gate_never_raises_a_pixel(mode):
    # under the frozen first-group scale later groups' coarse_n leaves [0, 1] (transistor seed 1: up to 1.25, where
    # the isotonic fit reached 1.007 and the gate raised 2e-4 of the pixels above their coarse score)
    gen = np.random.default_rng(5)
    coarse = gen.random((3, 8, 8)) * 2.6 - 1.3
    ard = 1 / (1 + np.exp(-4 * coarse - gen.normal(0, 0.3, coarse.shape)))
    cal = calibrate(coarse, ard, mode)
    assert 0.0 <= cal.min() and cal.max() <= 1.0
    g = combine(coarse, cal, "gate")
    assert np.all(g <= coarse + 1e-6) and np.all(g >= np.minimum(0.5 * coarse, coarse) - 1e-6)


@pytest.mark.parametrize("mode", ["quantile", "isotonic"])
def test_calibration_map_applies_a_groups_fit_to_new_maps(mode):
    """Fitted where the coarse map is 0.1 + 0.8·ARD exactly, the map sends new ARD values there too (clipped at the
    fitted range's ends), and on the fitted maps it is ``calibrate``."""
    gen = np.random.default_rng(0)
    ard = gen.uniform(0.2, 0.9, size=(3, 16, 16))
    coarse_n = 0.1 + 0.8 * ard
    fitted = calibration_map(coarse_n, ard, mode)
    np.testing.assert_array_equal(fitted(ard), calibrate(coarse_n, ard, mode))
    new = np.asarray([[0.0, 0.3, 0.5, 0.7, 1.0]])
    expected = 0.1 + 0.8 * np.clip(new, ard.min(), ard.max())
    np.testing.assert_allclose(fitted(new), expected, rtol=0, atol=2e-3)
    assert fitted(new).shape == new.shape and fitted(new).dtype == np.float32
    assert calibration_map(coarse_n, ard, "none")(new) is new
