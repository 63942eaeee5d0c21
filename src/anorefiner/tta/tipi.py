"""TIPI: test-time adaptation with transformation invariance (Nguyen et al., CVPR 2023), per group.

Facts from ``shared/specs/tta.md`` A.3 (``TIPI:tipi.py:L35-90``, ``TIPI:argument.py:L35``,
``TIPI:methods/tipi.py:L23-32``):

1. clean forward ``z = f(x)``;
2. random start ``delta0 ~ U[-eps, eps]`` per input element (ImageNet/VisDA setting), in the
   normalised input space, ``eps = 2/255``;
3. inner loss ``mean KL(p(x + delta0) || stopgrad p(x))`` (the "reverse" KL: the perturbed
   distribution first), gradient w.r.t. ``delta`` only;
4. one sign step ``delta = clip(delta0 + eps sign(grad), -eps, eps)`` (no clipping of ``x + delta``);
5. outer loss per unit ``KL(p(x + delta) || stopgrad p(x)) + lambda H(p(x))``, mean over units,
   ``lambda = 1`` (ImageNet); one SGD step (momentum 0.9, lr 0.00025/64 per sample x batch).

No selection (TIPI's ``--selective_entropy`` is parsed but unused). For a ViT there are no
BatchNorm statistics, so TIPI's two-branch BN wrapper is a no-op; only LN affine parameters adapt,
all of them (TIPI excludes no block). The backend scores ``x + delta`` in the place of ``x`` (MuSc:
against the other, clean images of the group). Micro-batches: delta is per image, so computing it
micro-batch by micro-batch changes nothing but the scale of the inner loss, which the sign ignores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import TTAMethod, GroupGrad, entropy, kl


@dataclass
class TIPIConfig:
    """TIPI constants (its ImageNet setting; tta.md A.3)."""

    epsilon: float = 2.0 / 255.0  # TIPI:argument.py:L35 / run.sh, normalised-input units
    lam: float = 1.0  # tent_coeff for ImageNet, VisDA and digits
    random_start: bool = True  # ImageNet/VisDA: delta0 ~ U[-eps, eps] (digits/CIFAR start at 0)
    lr_per_sample: float = 0.00025 / 64  # ImageNet/VisDA: SGD, 0.00025 at batch 64


def adversarial_delta(forward, x: torch.Tensor, clean: dict, config: TIPIConfig, gen: torch.Generator):
    """TIPI's one-step perturbation of ``x``. ``forward(x) -> {kind: logits}``; ``clean`` holds the
    clean logits (detached). Returns ``delta`` (no gradient)."""
    eps = float(config.epsilon)
    if not config.random_start:
        # digits/CIFAR: delta0 = 0 reuses the clean logits, where KL(p || stopgrad p) has a zero
        # gradient, so sign() leaves delta at 0 (computed exactly rather than from float noise).
        return torch.zeros_like(x)
    delta0 = (torch.rand(x.shape, generator=gen, dtype=torch.float32) * 2 - 1).mul_(eps).to(x.device, x.dtype)
    delta = delta0.clone().requires_grad_(True)
    adv = forward(x + delta)
    inner = sum(kl(adv[k], clean[k]).mean() for k in clean)
    (grad,) = torch.autograd.grad(inner, delta)
    return (delta0 + eps * grad.sign()).clamp_(-eps, eps).detach()


def unit_loss(adv_logits: torch.Tensor, clean_logits: torch.Tensor, lam: float) -> torch.Tensor:
    """``KL(p(x+delta) || stopgrad p(x)) + lam * H(p(x))`` per unit (gradient through both terms)."""
    return kl(adv_logits, clean_logits.detach()) + lam * entropy(clean_logits)


class TIPI(TTAMethod):
    config_class = TIPIConfig
    name = "tipi"
    all_blocks = True  # TIPI:tipi.py:L110-128: every norm layer, none skipped
    lr_batch = "actual"  # TIPI sets lr = lr_per_sample x the current batch size

    def step(self, adapter, x: torch.Tensor, gen: torch.Generator) -> dict:
        c = self.config
        backend = adapter.backend
        use_image = backend.image_loss

        def logits_of(inp, pos):
            u = backend.units(inp, pos)
            out = {"patch": u.patch}
            if use_image and u.image is not None:
                out["image"] = u.image
            return out

        acc, total = GroupGrad(adapter.params), 0
        for pos in adapter.micro_batches(len(x)):
            xb = adapter.move(x[pos])
            clean = logits_of(xb, pos)
            delta = adversarial_delta(lambda inp: logits_of(inp, pos), xb,
                                      {k: v.detach() for k, v in clean.items()}, c, gen)
            adv = logits_of(xb + delta, pos)
            terms = {}
            for k in clean:
                per_unit = unit_loss(adv[k], clean[k], c.lam)
                terms[k] = (per_unit.sum(), per_unit.numel())
                total += per_unit.numel()
            acc.add(terms)
        log = {"units": total, "kept": total, "kept_fraction": 1.0, "loss": acc.loss(), "stepped": not acc.empty}
        if not acc.empty:
            acc.write()
            adapter.optimizer.step()
        adapter.optimizer.zero_grad(set_to_none=True)
        return log
