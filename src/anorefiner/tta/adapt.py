"""The group-wise test-time-adaptation loop shared by SAR, DeYO and TIPI (tta.md A.5 P5).

Per category: the tower starts from the pretrained weights (restored at the end, so a backbone can
serve the next category), with a fresh SGD optimiser (momentum 0.9, no weight decay: all three
official codes). The test images are taken in the PGT groups (``make_groups`` with the run seed,
the same groups as MuSc* and PGT) and processed in order, the state carried from group to group
(continual within a category, as in all three official codes). Per group: the backend's context
(:meth:`begin_group`), one method step (one optimiser step; SAR: one SAM step), then the group's
maps. ``prediction: post`` (default) re-runs the group at the updated weights (group-level TTA:
"collect predictions per group"); ``pre`` keeps the maps computed before the group's update (the
official SAR/DeYO convention). Each group logs its kept fraction of units and its loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..log import LOG, progress
from .common import configure_params, default_adapt_blocks, micro_batches, restore, select_norm_params, snapshot, torch_generator
from .deyo import DeYO, DeYOConfig
from .musc import MuscTTAConfig
from .sar import SAR, SARConfig
from .tipi import TIPI, TIPIConfig

METHODS = ("tipi", "sar", "deyo")


@dataclass
class TTAConfig:
    """Options of ``anorefiner tta`` (config ``tta`` + ``backends.<name>.options``). The paper gives one
    sentence (Sec. 4 Baselines); every value below is open there and chosen as commented."""

    group_size: int | None = None  # None: the base backend's groups (MuSc*: its group_size), else the paper's u = 30
    micro_batch: int = 5  # images per forward with gradient; gradients accumulate to one step per group (A.5 P5)
    prediction: str = "post"  # "post": maps after the group's update; "pre": before it (official SAR/DeYO)
    adapt_blocks: int | None = None  # None: SAR/DeYO adapt the first 3/4 of the blocks (18 of 24), TIPI all
    ln_pre: bool = True  # A.5 P1: ln_pre is a norm below every adapted block (SAR's rule keeps it)
    ln_post: bool | None = None  # None: TIPI yes, SAR/DeYO no (final norm); never where the backend ignores it
    lr: float | None = None  # None: the official linear rule lr_per_sample x batch (group) size
    momentum: float = 0.9  # SGD momentum of all three official codes
    autocast: str = "auto"  # "auto": bfloat16 on CUDA (no loss scaling needed), none on CPU; or "none"/"bfloat16"/"float16"
    device: str = "auto"
    sar: SARConfig = field(default_factory=SARConfig)
    deyo: DeYOConfig = field(default_factory=DeYOConfig)
    tipi: TIPIConfig = field(default_factory=TIPIConfig)
    musc: MuscTTAConfig = field(default_factory=MuscTTAConfig)

    def validate(self) -> None:
        if self.prediction not in ("post", "pre"):
            raise ValueError(f"tta.prediction must be 'post' or 'pre', got {self.prediction!r}")
        if self.autocast not in ("auto", "none", "bfloat16", "float16"):
            raise ValueError(f"tta.autocast must be auto, none, bfloat16 or float16, got {self.autocast!r}")
        if self.micro_batch < 1:
            raise ValueError(f"tta.micro_batch must be >= 1, got {self.micro_batch}")

    def autocast_dtype(self, device: torch.device):
        name = self.autocast
        if name == "auto":
            name = "bfloat16" if device.type == "cuda" else "none"
        return None if name == "none" else getattr(torch, name)


def build_method(name: str, config: TTAConfig):
    if name == "sar":
        return SAR(config.sar)
    if name == "deyo":
        return DeYO(config.deyo)
    if name == "tipi":
        return TIPI(config.tipi)
    raise ValueError(f"unknown TTA method {name!r}; known: {', '.join(METHODS)}")


class Adapter:
    """The adapted parameters, their pretrained values and the optimiser of one category."""

    def __init__(self, backend, method, config: TTAConfig, nominal_batch: int):
        self.backend, self.method, self.config = backend, method, config
        visual = backend.visual
        n_blocks = len(visual.transformer.resblocks)
        blocks = config.adapt_blocks
        if blocks is None:
            blocks = n_blocks if method.all_blocks else default_adapt_blocks(n_blocks)
        ln_post = method.all_blocks if config.ln_post is None else bool(config.ln_post)
        ln_post = ln_post and backend.uses_ln_post
        named = select_norm_params(visual, blocks, config.ln_pre, ln_post)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        configure_params(backend.backbone.model if hasattr(backend, "backbone") else visual, self.params)
        self.pretrained = snapshot(self.params)
        self.nominal_batch = int(nominal_batch)
        self.optimizer = self._optimizer(self.nominal_batch)

    def _optimizer(self, batch: int):
        lr = self.config.lr if self.config.lr is not None else self.method.lr_per_sample() * batch
        return torch.optim.SGD(self.params, lr=lr, momentum=self.config.momentum, weight_decay=0.0)

    def set_batch(self, actual: int) -> None:
        """TIPI's rule: lr = lr_per_sample x the current batch size (others keep the nominal size)."""
        if self.method.lr_batch == "actual" and self.config.lr is None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.method.lr_per_sample() * actual

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def micro_batches(self, n: int):
        return micro_batches(n, self.config.micro_batch)

    def move(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.backend.device)

    def reset(self) -> None:
        """Back to the category's starting weights with a fresh optimiser (SAR's model recovery)."""
        restore(self.params, self.pretrained)
        self.optimizer = self._optimizer(self.nominal_batch)

    def release(self) -> None:
        restore(self.params, self.pretrained)
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None


def adapt_category(backend, method_name: str, groups: list[np.ndarray], load_group, config: TTAConfig,
                   seed: int, nominal_batch: int | None = None):
    """Adapt ``backend`` over one category's ``groups`` and return ``(maps, scores, log)``.

    ``load_group(indices) -> Tensor [G,3,R,R]`` gives the preprocessed images of a group;
    ``maps`` ``[N,h,w]`` and ``scores`` ``[N]`` are in index order; ``log`` has one dict per group.
    """
    config.validate()
    method = build_method(method_name, config)
    nominal = int(nominal_batch or max(len(g) for g in groups))
    adapter = Adapter(backend, method, config, nominal)
    method.start_category()
    n = int(sum(len(g) for g in groups))
    maps = scores = None
    logs = []
    LOG.info("tta %s on %s: %d images in %d groups, %d adapted LN tensors (%d scalars), lr %.3g",
             method_name, backend.name, n, len(groups), len(adapter.params),
             sum(p.numel() for p in adapter.params), adapter.lr)
    try:
        for gi, idx in enumerate(progress(groups, desc=f"tta {method_name}", unit="group")):
            start = time.perf_counter()
            idx = np.asarray(idx, dtype=np.int64)
            x = load_group(idx)
            adapter.set_batch(len(idx))
            backend.begin_group(x.to(backend.device))
            if config.prediction == "pre":
                g_maps, g_scores = backend.predict(x, idx)
            log = method.step(adapter, x, torch_generator(seed, "tta", method_name, gi))
            if config.prediction == "post":
                backend.begin_group(x.to(backend.device), calibrate=False)
                g_maps, g_scores = backend.predict(x, idx)
            if maps is None:
                maps = np.zeros((n,) + g_maps.shape[1:], dtype=np.float32)
                scores = np.zeros(n, dtype=np.float32)
            maps[idx], scores[idx] = g_maps, g_scores
            log = {"group": gi, "images": int(len(idx)), "lr": adapter.lr, **log,
                   "seconds": time.perf_counter() - start}
            logs.append(log)
            LOG.info("tta %s group %d/%d: %d images, kept %.3f of %d units, loss %.4f%s (%.1f s)",
                     method_name, gi + 1, len(groups), len(idx), log["kept_fraction"], log["units"],
                     log["loss"], f", ema {log['ema']}, reset {log['reset']}" if "ema" in log else "",
                     log["seconds"])
        scores = backend.finalize_scores(scores, [np.asarray(g) for g in groups])
    finally:
        adapter.release()
    return maps, scores, logs
