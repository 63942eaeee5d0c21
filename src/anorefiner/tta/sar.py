"""SAR: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023), per group.

Facts from ``shared/specs/tta.md`` A.1 (``SAR:sar.py:L15-106``, ``SAR:sam.py:L9-31``,
``SAR:main.py:L186-215``); the 2-class constants follow A.5 P3:

1. forward; keep units with entropy ``H < E0`` (strict), ``E0 = 0.4 ln C``; loss1 = mean H over them;
2. SAM first step: ``w <- w + rho g / (||g||_2 + 1e-12)`` (global norm over all adapted grads, rho 0.05);
3. forward again at the perturbed weights; keep the step-1 units whose new entropy is still ``< E0``;
   loss2 = their mean H; its gradient is taken at the perturbed point;
4. SAM second step: restore ``w``, one SGD step (momentum 0.9) with that gradient;
5. model recovery: ``ema <- loss2`` (first time) else ``0.9 ema + 0.1 loss2`` (loss2 not NaN);
   ``ema < e_m`` resets parameters and optimiser state to the category's start and clears ema.

Guards (A.5 P5): no unit kept in step 1 -> no update; none kept in step 3 -> the weights are
restored and no SGD step is taken (the official code would average an empty tensor).

A unit is a patch token (and an image, when the backend's image units enter the loss); units of
both kinds are averaged separately and summed (tta.md A.5 P2(a), "equal weight 1"). With C = 2 the
recovery threshold 0.2 nats (tuned for ImageNet's 1000 classes, max entropy 6.9) is scaled by
ln 2 / ln 1000 (A.5 P3): 0.2 nats would fire at once when entropies are capped at 0.693.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import TTAMethod, LN2, GroupGrad, entropy

#: SAR's recovery threshold 0.2 nats at C = 1000, rescaled to C = 2 (tta.md A.5 P3).
RESET_2CLASS = 0.2 * LN2 / math.log(1000.0)


@dataclass
class SARConfig:
    """SAR constants (official values; C = 2 rescaling where tta.md A.5 P3 explains it)."""

    e0_fraction: float = 0.4  # SAR:main.py --sar_margin_e0 = 0.4 * ln(C); E0 = 0.4 ln 2 = 0.277
    rho: float = 0.05  # SAR:sam.py default, not overridden by main.py; non-adaptive SAM
    reset_threshold: float = RESET_2CLASS  # 0.2 nats (SAR:sar.py:L102) x ln2/ln1000 = 0.0201
    ema_momentum: float = 0.9  # SAR:sar.py:L92: ema = 0.9 ema + 0.1 loss2
    lr_per_sample: float = 0.001 / 64  # SAR:main.py ViT rule: 0.001 at batch 64


def select(logits: torch.Tensor, e0: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropies of the units and SAR's reliable-unit mask ``H < e0``."""
    h = entropy(logits)
    return h, h < e0


def sam_perturbation(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """``e_w = rho * g / (||g||_2 + 1e-12)`` with the global L2 norm over every gradient."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    scale = rho / (float(norm) + 1e-12)
    return [g * scale for g in grads]


def update_ema(ema: float | None, loss2: float, momentum: float) -> float | None:
    """SAR's moving average of loss2 (unchanged when loss2 is NaN)."""
    if math.isnan(loss2):
        return ema
    return loss2 if ema is None else momentum * ema + (1.0 - momentum) * loss2


class SAR(TTAMethod):
    config_class = SARConfig
    name = "sar"
    all_blocks = False  # SAR:sar.py:L117-130 skips the last 25 % of the blocks and the final norm
    lr_batch = "nominal"  # SAR's lr is fixed from the configured test batch size

    def __init__(self, config: SARConfig | None = None):
        super().__init__(config)
        self.ema: float | None = None

    def start_category(self) -> None:
        self.ema = None

    def _terms(self, units, backend, keep: dict | None, e0: float):
        """Loss terms of one micro-batch; ``keep`` holds the first pass's masks (second pass)."""
        terms, masks, n_units = {}, {}, 0
        kinds = [("patch", units.patch)]
        if backend.image_loss and units.image is not None:
            kinds.append(("image", units.image))
        for kind, logits in kinds:
            h, m = select(logits, e0)
            if keep is not None:
                m = m & keep[kind]
            terms[kind] = ((h * m).sum(), int(m.sum()))
            masks[kind] = m.detach()
            n_units += m.numel()
        return terms, masks, n_units

    def step(self, adapter, x: torch.Tensor, gen: torch.Generator) -> dict:
        c = self.config
        e0 = c.e0_fraction * LN2
        backend, params = adapter.backend, adapter.params
        first, masks, total, kept = GroupGrad(params), [], 0, 0
        for pos in adapter.micro_batches(len(x)):
            terms, m, n = self._terms(backend.units(adapter.move(x[pos]), pos), backend, None, e0)
            first.add(terms)
            masks.append(m)
            total += n
            kept += sum(t[1] for t in terms.values())
        log = {"units": total, "kept": kept, "kept_fraction": kept / max(total, 1), "loss": first.loss()}
        if first.empty:
            log.update(loss2=float("nan"), kept2=0, ema=self.ema, reset=False, stepped=False)
            return log
        first.write()
        # SAM first step: climb to the locally worst point within radius rho.
        e_w = sam_perturbation([p.grad for p in params], c.rho)
        with torch.no_grad():
            for p, e in zip(params, e_w):
                p.add_(e)
        backend.begin_group(x, calibrate=False)  # the references move with the weights
        second, kept2 = GroupGrad(params), 0
        for pos, keep in zip(adapter.micro_batches(len(x)), masks):
            terms, _, _ = self._terms(backend.units(adapter.move(x[pos]), pos), backend, keep, e0)
            second.add(terms)
            kept2 += sum(t[1] for t in terms.values())
        loss2 = second.loss()
        with torch.no_grad():
            for p, e in zip(params, e_w):
                p.sub_(e)
        stepped = not second.empty
        if stepped:  # SGD step with the gradient taken at the perturbed point
            second.write()
            adapter.optimizer.step()
        adapter.optimizer.zero_grad(set_to_none=True)
        self.ema = update_ema(self.ema, loss2, c.ema_momentum)
        reset = self.ema is not None and self.ema < c.reset_threshold
        if reset:
            adapter.reset()
            log["ema_at_reset"] = self.ema
            self.ema = None
        log.update(loss2=loss2, kept2=kept2, ema=self.ema, reset=reset, stepped=stepped)
        return log
