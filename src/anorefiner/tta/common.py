"""Pieces shared by the test-time-adaptation baselines (SAR, DeYO, TIPI): the backend protocol,
2-class entropy/KL, the LayerNorm-affine parameter selection, and group-level gradient accumulation.

Facts from ``shared/specs/tta.md`` Part A (official code: ``SAR:sar.py``, ``DeYO:methods/deyo.py``,
``TIPI:tipi.py``); the mapping onto zero-shot anomaly detection is the PROPOSAL of A.5:

* **Units** (A.5 P2): a backend turns a micro-batch of images into 2-class logits
  ``(normal, abnormal)`` per *patch unit* ``[B, U, 2]`` and, optionally, per *image unit* ``[B, 2]``.
  Entropy, KL and DeYO's PLPD are taken over these 2-class distributions.
* **Parameters** (A.5 P1): only the affine ``weight``/``bias`` of the vision tower's LayerNorms,
  chosen by *type and block index* (never by SAR's name-substring rule, which would pick three
  middle blocks of a 24-block open_clip ViT, tta.md A.1 "PITFALL").
* **One optimiser step per group** (A.5 P5): micro-batches accumulate gradients. The loss of a
  group is a mean over its *selected* units, whose number is known only after the last
  micro-batch, so :class:`GroupGrad` accumulates the gradient of each loss term's *sum* and divides
  by the term's count at the end (exactly the gradient of the mean; a mean of an empty selection
  contributes nothing, the degenerate-case guard of A.5 P5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


@dataclass
class Units:
    """2-class logits ``(normal, abnormal)`` of one micro-batch.

    ``patch``: ``[B, U, 2]`` (U units per image, e.g. tokens x layers); ``image``: ``[B, 2]`` or None.
    Whether image units enter the loss is the backend's ``image_loss`` (APRIL-GAN: yes; MuSc: its
    image unit only serves DeYO's PLPD, tta.md A.5 P2(b)).
    """

    patch: torch.Tensor
    image: torch.Tensor | None = None


class TTABackend(Protocol):
    """What a zero-shot backend provides to be adapted at test time (docs/architecture.md, "TTA").

    ``visual`` is the open_clip ``VisionTransformer`` whose LayerNorm affine parameters adapt;
    ``uses_ln_post`` says whether the backend's outputs depend on ``visual.ln_post``.

    * ``begin_group(x, calibrate=True)``: no-grad context of a group ``x`` ``[G,3,R,R]`` at the
      current weights (MuSc: the reference tokens and, when ``calibrate``, the score calibration).
    * ``units(x, positions)``: :class:`Units` of a micro-batch ``x`` ``[B,3,R,R]`` whose images sit at
      ``positions`` ``[B]`` of the group (so a modified copy of an image replaces the image itself),
      differentiable w.r.t. the tower's parameters and ``x``.
    * ``predict(x)``: no-grad maps ``[G,h,w]`` and raw image scores ``[G]`` of the group (after
      ``begin_group`` at the same weights); ``finalize_scores(scores, groups)`` post-processes the
      image scores of the whole category (MuSc: RsCIN).
    """

    name: str
    visual: torch.nn.Module
    uses_ln_post: bool
    image_loss: bool
    device: torch.device

    def begin_group(self, x: torch.Tensor, calibrate: bool = True) -> None: ...

    def units(self, x: torch.Tensor, positions: torch.Tensor) -> Units: ...

    def predict(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]: ...

    def finalize_scores(self, scores: np.ndarray, groups: list[np.ndarray]) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------- formulas
def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` over the last axis: ``-sum_c p_c log p_c``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl(first_logits: torch.Tensor, second_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per unit with ``p = softmax(first)``, ``q = softmax(second)`` (last axis)."""
    logp = F.log_softmax(first_logits.float(), dim=-1)
    logq = F.log_softmax(second_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


# ---------------------------------------------------------------------------------------- parameters
def default_adapt_blocks(n_blocks: int) -> int:
    """SAR/DeYO's rule "skip the top quarter of the blocks" (ViT-B: blocks 0-8 of 12; ViT-L: 18 of 24)."""
    return n_blocks - n_blocks // 4


def select_norm_params(visual: torch.nn.Module, n_blocks: int, ln_pre: bool, ln_post: bool):
    """``[(name, parameter)]``: affine weight and bias of ``ln_pre`` (if asked), ``ln_1``/``ln_2`` of
    the first ``n_blocks`` residual blocks, and ``ln_post`` (if asked), in that order."""
    blocks = visual.transformer.resblocks
    if not 0 <= n_blocks <= len(blocks):
        raise ValueError(f"tta: adapt_blocks={n_blocks} is outside 0..{len(blocks)} (blocks of the tower)")
    modules = []
    if ln_pre:
        modules.append(("ln_pre", visual.ln_pre))
    for i in range(n_blocks):
        for sub in ("ln_1", "ln_2"):
            modules.append((f"transformer.resblocks.{i}.{sub}", getattr(blocks[i], sub)))
    if ln_post:
        modules.append(("ln_post", visual.ln_post))
    out = []
    for name, mod in modules:
        if not isinstance(mod, torch.nn.LayerNorm):
            raise ValueError(f"tta: {name} is a {type(mod).__name__}, not a LayerNorm (only LN affine adapts)")
        if mod.weight is None or mod.bias is None:
            raise ValueError(f"tta: LayerNorm {name} has no affine parameters to adapt")
        out += [(f"{name}.weight", mod.weight), (f"{name}.bias", mod.bias)]
    return out


def configure_params(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    """Freeze everything, then let gradients reach ``params`` only (eval mode is kept: the CLIP
    tower has no BatchNorm, and eval keeps open_clip's patch dropout an identity)."""
    model.requires_grad_(False)
    for p in params:
        if p.dtype != torch.float32:
            raise ValueError(f"tta: adapted parameters must be float32 master copies, got {p.dtype}")
        p.requires_grad_(True)


def snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def restore(params: list[torch.nn.Parameter], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)


# ---------------------------------------------------------------------------------------- gradients
class TTAMethod:
    """What SAR, DeYO and TIPI share: a config dataclass (``config_class``) with ``lr_per_sample``."""

    config_class: type = object

    def __init__(self, config=None):
        self.config = config or self.config_class()

    def lr_per_sample(self) -> float:
        return self.config.lr_per_sample

    def start_category(self) -> None:
        """Reset per-category state (none unless a method keeps some)."""


class GroupGrad:
    """Gradient of ``sum_k mean_k`` over loss terms ``k`` (e.g. ``"patch"``, ``"image"``), each a mean
    over units selected across all micro-batches of a group, accumulated one micro-batch at a time."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.grads: dict[str, list[torch.Tensor]] = {}
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, terms: dict[str, tuple[torch.Tensor, int]]) -> None:
        """``terms[k] = (sum of the selected units' losses (with grad), number selected)``."""
        live = [(k, s, int(c)) for k, (s, c) in terms.items() if int(c) > 0]
        for j, (k, total, count) in enumerate(live):
            grads = torch.autograd.grad(total, self.params, retain_graph=j < len(live) - 1, allow_unused=True)
            acc = self.grads.setdefault(k, [torch.zeros_like(p) for p in self.params])
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g.detach().to(a.dtype))
            self.sums[k] = self.sums.get(k, 0.0) + float(total.detach())
            self.counts[k] = self.counts.get(k, 0) + count
        for k, (_, c) in terms.items():
            self.counts.setdefault(k, 0)

    @property
    def empty(self) -> bool:
        return not any(self.counts.get(k, 0) for k in self.grads)

    def loss(self) -> float:
        """``sum_k (sum_k / count_k)`` over non-empty terms; NaN when every term is empty."""
        vals = [self.sums[k] / self.counts[k] for k in self.grads if self.counts.get(k)]
        return float(sum(vals)) if vals else float("nan")

    def write(self) -> None:
        """Set each parameter's ``.grad`` to the gradient of the summed means."""
        for i, p in enumerate(self.params):
            g = torch.zeros_like(p)
            for k, acc in self.grads.items():
                if self.counts.get(k):
                    g.add_(acc[i] / self.counts[k])
            p.grad = g


def micro_batches(n: int, size: int) -> list[torch.Tensor]:
    """Group positions ``0..n-1`` in consecutive micro-batches of at most ``size``."""
    if size < 1:
        raise ValueError(f"tta: micro_batch must be >= 1, got {size}")
    return [torch.arange(s, min(n, s + size)) for s in range(0, n, size)]


def torch_generator(seed: int, *streams) -> torch.Generator:
    """A CPU torch generator for ``seed`` and a named sub-stream (random tensors are drawn on the
    CPU and moved, so a seed gives the same draws on every device)."""
    from ..seeding import rng

    return torch.Generator().manual_seed(int(rng(seed, *streams).integers(0, 2**62)))
