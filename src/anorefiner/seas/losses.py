"""SeaS's losses and noise formula (HUST-SLOW/SeaS 4645d3b), each checked against a float64 loop in
tests/unit/seas/test_losses.py.

* :func:`da_loss`: Decoupled Anomaly Alignment (``models/seas.py`` L459-L479, ``normalize_attention_maps``
  L91-L97): at each resolution, the anomaly tokens' mean map and the normal token's map are min-max normalised
  over the whole batch; ``mean((A − M)²)`` over all pixels plus ``mean((N − (1 − M))²)`` over the anomalous
  pixels (``M == 1``, or ``M > 0`` for small defects), where ``M`` is the mask resized bilinearly to the latent
  size and max-pooled to the map's size.
* :func:`focal_loss`: the RMP's loss (``models/modules/_focal_loss.py`` L21-L88 with its defaults: two classes,
  gamma 2, label smoothing 1e-5, targets cast to integers, so only pixels whose mask value is exactly 1 are
  anomalous): ``mean(−(1 − p_t)^γ · log p_t)`` with ``p_t = Σ_c clamp(onehot)_c p_c + smooth``.
* :func:`add_more_noise`: the reference latent noised to the last step of a ``steps``-step scaled-linear schedule
  (``models/modules/_scheduling_dpmsolver_multistep.py`` L750-L782): ``√ᾱ·x + √(1 − ᾱ)·ε``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def minmax(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``(x − min) / (max − min)`` over the whole tensor (the official code's batch-wide normalisation)."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo).clamp_min(eps)


def pooled_masks(mask: torch.Tensor, latent: int, factors) -> dict[int, torch.Tensor]:
    """``{factor: [B,1,latent/f,latent/f]}``: the mask resized bilinearly to the latent size, then max-pooled."""
    gt = F.interpolate(mask.float(), size=(latent, latent), mode="bilinear", align_corners=False)
    return {int(f): F.max_pool2d(gt, kernel_size=int(f), stride=int(f)) if int(f) > 1 else gt for f in factors}


def da_loss(maps: dict[int, torch.Tensor], normal_pos: torch.Tensor, anomaly_pos: torch.Tensor,
            masks: dict[int, torch.Tensor], small_defects: bool = False) -> torch.Tensor:
    """Sum over resolutions of the DA loss (module docstring).

    ``maps[f]``: cross-attention probabilities ``[B,H,W,L]`` of the anomaly images; ``normal_pos`` /
    ``anomaly_pos``: ``[B,L]`` booleans marking the normal and anomaly token positions of each prompt;
    ``masks[f]``: ``[B,1,H,W]``. An empty anomalous-pixel set adds 0 (the official code would add NaN).
    """
    total = maps[next(iter(maps))].new_zeros(())
    for f, m in maps.items():
        m = m.float()
        normal = minmax(_token_mean(m, normal_pos))
        anomaly = minmax(_token_mean(m, anomaly_pos))
        gt = masks[f][:, 0].float()
        total = total + ((anomaly - gt) ** 2).mean()
        sel = gt > 0 if small_defects else gt == 1
        if sel.any():
            total = total + ((normal[sel] - (1 - gt)[sel]) ** 2).mean()
    return total


def _token_mean(m: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Mean over the marked token positions of each row: ``[B,H,W,L], [B,L] -> [B,H,W]``."""
    w = pos.to(m.dtype)
    return (m * w[:, None, None, :]).sum(-1) / w.sum(-1).clamp_min(1)[:, None, None]


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """``probs`` [B,2,H,W] (softmax), ``target`` [B,1,H,W] (cast to integer class indices)."""
    p = probs.float().permute(0, 2, 3, 1).reshape(-1, probs.shape[1])
    idx = target.reshape(-1).long()
    onehot = F.one_hot(idx, probs.shape[1]).float().clamp(smooth / (probs.shape[1] - 1), 1.0 - smooth)
    pt = (onehot * p).sum(1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def alpha_bar_last(steps: int, beta_start: float, beta_end: float) -> float:
    """ᾱ at the last step of a ``steps``-step scaled-linear schedule (betas = linspace(√β0, √β1, steps)²)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, int(steps), dtype=torch.float64) ** 2
    return float(torch.prod(1.0 - betas))


def add_more_noise(latents: torch.Tensor, noise: torch.Tensor, steps: int, beta_start: float,
                   beta_end: float) -> torch.Tensor:
    """``√ᾱ·latents + √(1 − ᾱ)·noise`` with ᾱ of :func:`alpha_bar_last`."""
    a = alpha_bar_last(steps, beta_start, beta_end)
    return a ** 0.5 * latents + (1.0 - a) ** 0.5 * noise
