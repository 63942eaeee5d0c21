"""DeYO: destroy your object (Lee et al., ICLR 2024), per group.

Facts from ``shared/specs/tta.md`` A.2 (``DeYO:methods/deyo.py:L90-186``, ``DeYO:config.py:L39-62``,
``DeYO:main.py:L268-271``):

1. forward ``x``; entropy ``H`` per unit; keep ``H < tau_Ent`` with ``tau_Ent = 0.5 ln C``;
2. ``x'`` = object-destroyed copy: resize the square image to a multiple of ``patch_len`` (= 4),
   cut a 4 x 4 grid, permute the 16 tiles independently per image, reassemble, resize back;
   forwarded without gradient;
3. ``PLPD = p(y_hat | x) - p(y_hat | x')`` with ``y_hat = argmax p(. | x)``; keep ``PLPD > tau_PLPD``;
4. weight (detached) ``alpha = exp(Ent0 - H) + exp(PLPD)``, ``Ent0 = 0.4 ln C``; loss = mean over
   the kept units of ``alpha * H``; one SGD step (momentum 0.9).

Mapping (A.5 P4): the tile borders do not align with the token grid, so PLPD is computed per
*image* (on the backend's image unit) and its filter and weight apply to all of that image's patch
units, which are filtered by their own entropy too. The backend scores ``x'`` in the place of ``x``
(MuSc: against the other images of the group). ``pixel`` and ``occ`` are DeYO's other
augmentations (all pixels shuffled; the central half-size square filled with the image's
per-channel mean, 112 px at (56, 56) for 224 px in the official code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import TTAMethod, LN2, GroupGrad, entropy

AUG_TYPES = ("patch", "pixel", "occ")


@dataclass
class DeYOConfig:
    """DeYO constants (official defaults, thresholds as fractions of ln C with C = 2, tta.md A.5 P3)."""

    ent_fraction: float = 0.5  # deyo_margin = 0.5 ln C: entropy filter tau_Ent = 0.347 at C = 2
    ent0_fraction: float = 0.4  # deyo_margin_e0 = 0.4 ln C: reweighting reference Ent0 = 0.277
    plpd_threshold: float = 0.2  # exp_deyo.sh: 0.2 for every ViT/wild run (a probability: scale-free)
    patch_len: int = 4  # tiles per row and column (16 tiles)
    aug_type: str = "patch"  # official default; "pixel" and "occ" are its alternatives
    filter_ent: bool = True  # DeYO's four switches, all on by default (config.py)
    filter_plpd: bool = True
    reweight_ent: bool = True
    reweight_plpd: bool = True
    lr_per_sample: float = 0.001 / 64  # DeYO:main.py ViT rule, as SAR's


def destroy(x: torch.Tensor, gen: torch.Generator, patch_len: int = 4, aug_type: str = "patch") -> torch.Tensor:
    """DeYO's object-destroying augmentation of a batch ``[B, C, H, W]`` (random draws from ``gen``)."""
    if aug_type not in AUG_TYPES:
        raise ValueError(f"deyo aug_type must be one of {AUG_TYPES}, got {aug_type!r}")
    n, c, h, w = x.shape
    if aug_type == "occ":
        out = x.clone()
        mean = x.mean(dim=(2, 3), keepdim=True)
        out[:, :, h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = mean
        return out
    if aug_type == "pixel":
        perm = torch.argsort(torch.rand(n, h * w, generator=gen), dim=-1).to(x.device)
        flat = x.reshape(n, c, h * w)
        return torch.gather(flat, 2, perm[:, None, :].expand(n, c, h * w)).reshape(n, c, h, w)
    if patch_len < 1:
        raise ValueError(f"deyo patch_len must be >= 1, got {patch_len}")
    side = (w // patch_len) * patch_len  # the official code sizes the square from the width
    resized = (h, w) != (side, side)
    y = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True) if resized else x
    t, k = side // patch_len, patch_len
    tiles = y.reshape(n, c, k, t, k, t).permute(0, 2, 4, 1, 3, 5).reshape(n, k * k, c, t, t)
    perm = torch.argsort(torch.rand(n, k * k, generator=gen), dim=-1).to(x.device)
    tiles = tiles[torch.arange(n, device=x.device)[:, None], perm]
    y = tiles.reshape(n, k, k, c, t, t).permute(0, 3, 1, 4, 2, 5).reshape(n, c, side, side)
    if resized:
        y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return y


def plpd(image_logits: torch.Tensor, destroyed_logits: torch.Tensor) -> torch.Tensor:
    """``p(y_hat|x) - p(y_hat|x')`` per image, ``y_hat = argmax p(.|x)`` (no gradient)."""
    p = torch.softmax(image_logits.detach().float(), -1)
    q = torch.softmax(destroyed_logits.detach().float(), -1)
    y = p.argmax(-1, keepdim=True)
    return (p.gather(-1, y) - q.gather(-1, y)).squeeze(-1)


def weighted_terms(logits: torch.Tensor, image_plpd: torch.Tensor, config: DeYOConfig):
    """DeYO's selection and weights for units ``logits`` ``[B, U, 2]`` (or ``[B, 2]``) of images
    with PLPD ``[B]``: returns (entropies, mask, weights, weighted entropies)."""
    c = config
    h = entropy(logits)
    shape = (-1,) + (1,) * (h.ndim - 1)
    pl = image_plpd.reshape(shape).to(h.device)
    mask = torch.ones_like(h, dtype=torch.bool)
    if c.filter_ent:
        mask &= h < c.ent_fraction * LN2
    if c.filter_plpd:
        mask &= pl > c.plpd_threshold
    weight = torch.ones_like(h)
    if c.reweight_ent or c.reweight_plpd:
        weight = (float(c.reweight_ent) * torch.exp(c.ent0_fraction * LN2 - h.detach())
                  + float(c.reweight_plpd) * torch.exp(pl).expand_as(h))
    return h, mask, weight, weight * h


class DeYO(TTAMethod):
    config_class = DeYOConfig
    name = "deyo"
    all_blocks = False  # DeYO:methods/deyo.py collect_params: SAR's rule, copied
    lr_batch = "nominal"

    def step(self, adapter, x: torch.Tensor, gen: torch.Generator) -> dict:
        c = self.config
        backend, params = adapter.backend, adapter.params
        acc, total, kept, plpds = GroupGrad(params), 0, 0, []
        for pos in adapter.micro_batches(len(x)):
            xb = adapter.move(x[pos])
            units = backend.units(xb, pos)
            if units.image is None:
                raise ValueError(f"deyo: backend {backend.name!r} gives no image units (PLPD is per image)")
            with torch.no_grad():
                destroyed = backend.units(destroy(xb, gen, c.patch_len, c.aug_type), pos)
            pl = plpd(units.image, destroyed.image)
            plpds.append(pl.cpu())
            kinds = [("patch", units.patch)]
            if backend.image_loss:
                kinds.append(("image", units.image))
            terms = {}
            for kind, logits in kinds:
                _, mask, _, wh = weighted_terms(logits, pl, c)
                terms[kind] = ((wh * mask).sum(), int(mask.sum()))
                total += mask.numel()
                kept += int(mask.sum())
            acc.add(terms)
        all_plpd = torch.cat(plpds)
        log = {"units": total, "kept": kept, "kept_fraction": kept / max(total, 1), "loss": acc.loss(),
               "plpd_mean": float(all_plpd.mean()),
               "plpd_kept_images": int((all_plpd > c.plpd_threshold).sum()), "stepped": not acc.empty}
        if not acc.empty:
            acc.write()
            adapter.optimizer.step()
        adapter.optimizer.zero_grad(set_to_none=True)
        return log
