"""SAR (tta.md A.1): selection, SAM perturbation and recovery against independent slow readings."""

from __future__ import annotations

import math

import pytest
import torch

from anorefiner.tta.adapt import Adapter, TTAConfig
from anorefiner.tta.common import LN2
from anorefiner.tta.sar import RESET_2CLASS, SAR, SARConfig, sam_perturbation, select, update_ema


def _entropy64(logits):
    p = torch.softmax(logits.double(), -1)
    return -(p * p.log()).sum(-1)


def test_constants_for_two_classes():
    c = SARConfig()
    assert c.e0_fraction * LN2 == pytest.approx(0.2773, abs=1e-4)
    assert RESET_2CLASS == pytest.approx(0.2 * math.log(2) / math.log(1000), rel=1e-12)
    assert c.rho == 0.05 and c.ema_momentum == 0.9
    assert c.lr_per_sample * 30 == pytest.approx(4.6875e-4)


def test_selection_and_sam_match_loops():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, 2, generator=g) * 3
    e0 = 0.4 * math.log(2)
    h, mask = select(logits, e0)
    for i in range(4):
        for j in range(9):
            a, b = logits[i, j].double().tolist()
            pa = 1.0 / (1.0 + math.exp(b - a))
            ent = -(pa * math.log(pa) + (1 - pa) * math.log(1 - pa))
            assert h[i, j].item() == pytest.approx(ent, abs=1e-6)
            assert bool(mask[i, j]) == (ent < e0)
    grads = [torch.randn(3, generator=g), torch.randn(2, 2, generator=g)]
    e_w = sam_perturbation(grads, 0.05)
    norm = math.sqrt(sum(v * v for gr in grads for v in gr.double().flatten().tolist()))
    for gr, e in zip(grads, e_w):
        for v, ev in zip(gr.flatten().tolist(), e.flatten().tolist()):
            assert ev == pytest.approx(0.05 * v / (norm + 1e-12), rel=1e-6)


def test_ema_recurrence():
    assert update_ema(None, 0.5, 0.9) == 0.5
    assert update_ema(0.5, 0.1, 0.9) == pytest.approx(0.9 * 0.5 + 0.1 * 0.1)
    assert update_ema(0.3, float("nan"), 0.9) == 0.3


def _sar_reference(backend, x, params, lr, e0, rho):
    """One SAR step on the full batch (no micro-batches), written from tta.md A.1 in float64."""
    pos = torch.arange(len(x))

    def loss_and_masks(keep=None):
        u = backend.units(x, pos)
        hp, hi = _entropy64(u.patch), _entropy64(u.image)
        mp, mi = hp < e0, hi < e0
        if keep is not None:
            mp, mi = mp & keep[0], mi & keep[1]
        # a kind with no kept unit contributes nothing (the empty-selection guard of tta.md A.5 P5)
        terms = [h[m].mean() for h, m in ((hp, mp), (hi, mi)) if m.any()]
        return sum(terms), (mp, mi)

    start = [p.detach().clone() for p in params]
    loss1, keep = loss_and_masks()
    g1 = torch.autograd.grad(loss1, params)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in g1))
    with torch.no_grad():
        for p, g in zip(params, g1):
            p.add_(rho * g / (norm + 1e-12))
    loss2, _ = loss_and_masks(keep)
    g2 = torch.autograd.grad(loss2, params)
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    # first SGD-momentum step: buffer = gradient, p <- p - lr * g
    return [s - lr * g.float() for s, g in zip(start, g2)], loss1.item(), loss2.item(), keep


def test_step_matches_the_full_batch_reading(head_backend, group_images):
    cfg = TTAConfig(micro_batch=4, lr=0.5)
    method = SAR(cfg.sar)
    adapter = Adapter(head_backend, method, cfg, nominal_batch=len(group_images))
    e0 = cfg.sar.e0_fraction * LN2
    expected, loss1, loss2, keep = _sar_reference(head_backend, group_images, adapter.params, 0.5, e0, cfg.sar.rho)
    kept = int(keep[0].sum() + keep[1].sum())
    total = keep[0].numel() + keep[1].numel()
    assert 0 < kept < total  # a mixed selection, so the filter is exercised
    log = method.step(adapter, group_images, torch.Generator().manual_seed(0))
    assert log["kept"] == kept and log["units"] == total
    assert log["loss"] == pytest.approx(loss1, rel=1e-5) and log["loss2"] == pytest.approx(loss2, rel=1e-5)
    assert log["ema"] == pytest.approx(loss2, rel=1e-5) and not log["reset"]
    for p, e in zip(adapter.params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(p.detach(), s) for p, s in zip(adapter.params, adapter.pretrained))


def test_reset_fires_when_the_ema_falls_below_the_threshold(head_backend, group_images):
    # a threshold above any entropy (<= ln 2): the ema of the first step is below it -> reset
    cfg = TTAConfig(micro_batch=3, lr=0.5, sar=SARConfig(reset_threshold=0.7))
    method = SAR(cfg.sar)
    adapter = Adapter(head_backend, method, cfg, nominal_batch=6)
    log = method.step(adapter, group_images, torch.Generator().manual_seed(0))
    assert log["reset"] and log["ema"] is None and log["ema_at_reset"] < 0.7
    for p, s in zip(adapter.params, adapter.pretrained):
        assert torch.equal(p.detach(), s)
    assert all(not st for st in adapter.optimizer.state.values())  # fresh optimiser state
    # threshold 0 never fires; the ema then follows 0.9 ema + 0.1 loss2 from group to group
    cfg0 = TTAConfig(micro_batch=3, lr=0.5, sar=SARConfig(reset_threshold=0.0))
    sar0 = SAR(cfg0.sar)
    adapter0 = Adapter(head_backend, sar0, cfg0, nominal_batch=6)
    first = sar0.step(adapter0, group_images, torch.Generator().manual_seed(0))
    second = sar0.step(adapter0, group_images.flip(0), torch.Generator().manual_seed(1))
    assert not first["reset"] and not second["reset"]
    assert second["ema"] == pytest.approx(0.9 * first["loss2"] + 0.1 * second["loss2"], rel=1e-9)
