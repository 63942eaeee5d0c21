"""TIPI (tta.md A.3): the one-step input perturbation and the KL + entropy loss against slow readings."""

from __future__ import annotations

import math

import pytest
import torch

from anorefiner.tta.adapt import Adapter, TTAConfig
from anorefiner.tta.common import micro_batches
from anorefiner.tta.tipi import TIPI, TIPIConfig, adversarial_delta, unit_loss


def _kl64(a, b):
    p, q = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    return (p * (p.log() - q.log())).sum(-1)


def _entropy64(logits):
    p = torch.softmax(logits.double(), -1)
    return -(p * p.log()).sum(-1)


def test_unit_loss_matches_loops():
    g = torch.Generator().manual_seed(0)
    adv, clean = torch.randn(3, 5, 2, generator=g) * 2, torch.randn(3, 5, 2, generator=g) * 2
    got = unit_loss(adv, clean, lam=1.0)
    for i in range(3):
        for j in range(5):
            p = torch.softmax(adv[i, j].double(), -1).tolist()
            q = torch.softmax(clean[i, j].double(), -1).tolist()
            ref = sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q)) - sum(v * math.log(v) for v in q)
            assert got[i, j].item() == pytest.approx(ref, abs=1e-6)
    assert TIPIConfig().epsilon == pytest.approx(2 / 255) and TIPIConfig().lam == 1.0


def test_delta_is_one_sign_step_from_a_random_start():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 2, generator=g)
    x = torch.randn(4, 3, 2, 2, generator=g)

    def forward(inp):
        return {"patch": (inp.flatten(1) @ w).reshape(4, 1, 2)}

    clean = {"patch": forward(x)["patch"].detach()}
    cfg = TIPIConfig(epsilon=0.1)
    delta = adversarial_delta(forward, x, clean, cfg, torch.Generator().manual_seed(7))
    # slow reading: the same uniform start, the gradient of the mean KL w.r.t. delta in float64
    d0 = (torch.rand(x.shape, generator=torch.Generator().manual_seed(7)) * 2 - 1) * 0.1
    d = d0.double().requires_grad_(True)
    kl = _kl64(((x.double() + d).flatten(1) @ w.double()), clean["patch"].reshape(4, 2)).mean()
    (grad,) = torch.autograd.grad(kl, d)
    expected = (d0.double() + 0.1 * grad.sign()).clamp(-0.1, 0.1)
    torch.testing.assert_close(delta.double(), expected, rtol=0, atol=1e-7)
    assert delta.abs().max() <= 0.1 + 1e-7
    # digits/CIFAR setting: no random start -> the KL is at its minimum, no perturbation
    zero = adversarial_delta(forward, x, clean, TIPIConfig(epsilon=0.1, random_start=False), torch.Generator())
    assert torch.count_nonzero(zero) == 0


def test_step_matches_the_full_batch_reading(head_backend, group_images):
    x, n, mb, eps = group_images, len(group_images), 4, 0.05
    cfg = TTAConfig(micro_batch=mb, lr=0.5, tipi=TIPIConfig(epsilon=eps))
    method = TIPI(cfg.tipi)
    adapter = Adapter(head_backend, method, cfg, nominal_batch=n)
    params = adapter.params
    start = [p.detach().clone() for p in params]
    pos = torch.arange(n)
    # random starts as the step draws them (one draw per micro-batch from the same generator)
    gen = torch.Generator().manual_seed(4)
    d0 = torch.cat([(torch.rand(x[p].shape, generator=gen) * 2 - 1) * eps for p in micro_batches(n, mb)])
    clean = head_backend.units(x, pos)
    c_patch, c_image = clean.patch.detach(), clean.image.detach()
    d = d0.clone().requires_grad_(True)
    a = head_backend.units(x + d, pos)
    # per micro-batch means and one full-batch mean differ by a positive factor: same signs
    inner = _kl64(a.patch, c_patch).mean() + _kl64(a.image, c_image).mean()
    (gd,) = torch.autograd.grad(inner, d)
    delta = (d0 + eps * gd.sign()).clamp(-eps, eps)
    adv = head_backend.units(x + delta, pos)
    loss = ((_kl64(adv.patch, c_patch) + _entropy64(clean.patch)).mean()
            + (_kl64(adv.image, c_image) + _entropy64(clean.image)).mean())
    grads = torch.autograd.grad(loss, params)
    log = method.step(adapter, x, torch.Generator().manual_seed(4))
    # Tolerances: 5 of the input-gradient entries here are < 1e-9 (median 1e-5), so float32 noise in the
    # micro-batched step may flip their sign, i.e. move those pixels by 2*eps: a 1e-5-level change.
    assert log["kept_fraction"] == 1.0 and log["loss"] == pytest.approx(loss.item(), rel=1e-4)
    for p, s, g in zip(params, start, grads):
        torch.testing.assert_close(p.detach(), s - 0.5 * g.float(), rtol=1e-4, atol=3e-5)


def test_lr_follows_the_current_batch_size(head_backend):
    cfg = TTAConfig()
    adapter = Adapter(head_backend, TIPI(cfg.tipi), cfg, nominal_batch=30)
    assert adapter.lr == pytest.approx(0.00025 / 64 * 30)
    adapter.set_batch(21)
    assert adapter.lr == pytest.approx(0.00025 / 64 * 21)
    # TIPI adapts every block's LNs (+ ln_pre; ln_post only where the backend uses it)
    assert len(adapter.params) == 2 + 4 * 2 * 2
