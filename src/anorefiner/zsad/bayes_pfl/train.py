"""Training of Bayes-PFL on the auxiliary dataset (``xiaozhen228/Bayes-PFL@8f155a0`` ``train.py``, ``train.sh``,
``datasets.py``, ``loss.py``, ``models/VPB.py``).

Recipe (the defaults of :class:`TrainConfig`):

* data: the auxiliary dataset's *test split with masks*, every category (``meta_<dataset>.json["test"]``);
  MVTec AD as the auxiliary set: with probability 0.4 (``aug_rate``) a sample is replaced by a 2x2 mosaic of 4 random
  anomalous test images of its class, label 1 (``combine_img``); then the albumentations pipeline of VCP-CLIP (the
  same author's ``Trans``: Rotate 30, RandomRotate90, RandomBrightnessContrast, GaussNoise, OneOf[Blur,
  ColorJitter, GaussianBlur], each p = 0.5; :mod:`..vcp_clip.train`'s numpy/PIL version); images squash-resized
  bicubically, masks bilinearly then ``> 0.5``;
* frozen CLIP features under no_grad: ``g = ln_post(CLS) @ proj`` and the raw tokens of blocks 6/12/18/24;
* per batch (``train.py`` l.206-246): one sample of each flow (the image-specific one per image), the text pairs of
  the 3 bank prompts, one prompt index ``p`` drawn uniformly; stage 1 loss = CE(image logits of pair p) + sum over
  the layers of the focal + dice loss of ``softmax(bilinear(pixel logits of pair p))`` + 0.01 (KL_context +
  KL_normal + KL_abnormal) + the orthogonality loss of the text; stage 2 loss = CE of the stage-2 image logits
  (``image_mapping(g + fuse(tokens))``), only ``class_mapping``, ``image_mapping`` and ``fuse`` updated;
* Adam betas (0.5, 0.999), stage 1 groups: prompts 1e-3, temperatures 0.01, flow parameters ("PFL" without
  encoder / decoder) 1e-3, everything else 1e-4, under a cosine schedule with 10 % linear warm-up over
  ``schedule_epochs`` = 30 epochs of batches (stepped every batch, also during stage 2); stage 2: a new Adam, 1e-4,
  constant; batch 32, seed 333.

Stage lengths (``stage1_epochs``, ``stage2_epochs``) are the one open value: the official loop switches to stage 2
when the pixel AP on five classes of the *target* dataset stops improving (patience 3, reverting to the best
epoch) and stops stage 2 the same way on the image AP, within 30 epochs. This pipeline never looks at the target
set: it trains stage 1 for 25 epochs and stage 2 for 5 (the least the patience rule allows), the 30 epochs of the
official budget, and keeps the last weights (docs/backends.md).

The checkpoint ``{"MyModel": state_dict, "meta": {...}}`` is the official format plus ``meta``, written atomically,
loadable with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...log import LOG, progress
from ..aa_clip.model import dims_of
from ..april_gan.train import optimizer_step, prefetched, training_samples
from ..checkpoints import check_finite_loss, save_checkpoint, training_info
from ..vcp_clip.train import _load_sample, draw_augmentation, mosaic_pick_anomalous
from .backend import CHECKPOINT_KEY, load_model
from .model import BayesPfl, dice_loss, focal_loss, kl_term, orthogonal_loss, planar_flows, sample
from .prompts import class_tokens, text_embeddings


@dataclass
class TrainConfig:
    """Bayes-PFL training options (config ``backends.<name>.train.<auxiliary dataset>``)."""

    stage1_epochs: int = 25  # open: the official switch watches the target set (module docstring)
    stage2_epochs: int = 5  # open: the fewest epochs the official patience rule gives stage 2
    schedule_epochs: int = 30  # train.sh --epochs 30: the cosine schedule spans them
    warmup: float = 0.1  # get_cosine_schedule_with_warmup(num_warmup_steps = 0.1 x all steps)
    batch_size: int = 32  # train.sh --batch_size
    lr_prompt: float = 1e-3  # --learning_rate_prompt
    lr_pfl: float = 1e-3  # --learning_rate_PFL
    lr_linear: float = 1e-4  # --learning_rate_linear (also stage 2)
    lr_temperature: float = 0.01  # the temperature group
    betas: tuple = (0.5, 0.999)  # both Adam optimisers
    prompt_num: int = 3  # --prompt_num (B)
    context_len: int = 5  # --prompt_context_len (P)
    state_len: int = 5  # --prompt_state_len (Q)
    num_flows: int = 10  # --num_flows (K)
    rca_heads: int = 4  # Zero_Parameter num_heads
    kl_weight: float = 0.01  # forward_ensemble: 0.01 x each KL
    seed: int = 333  # train.sh --seed
    mosaic_p: float = 0.0  # datasets.py aug_rate 0.4, MVTec AD only (the config's mvtec_ad entry sets it)
    augment: bool = True  # datasets.py Trans
    aug_p: float = 0.5  # every albumentations transform's p
    rotate_limit: float = 30.0  # A.Rotate(limit=30)
    max_images: int | None = None  # cap per category (smoke runs); None = the whole test split
    workers: int = 4  # image-decoding threads; the result does not depend on it

    @property
    def epochs(self) -> int:
        """All epochs of both stages (what ``anorefiner plan`` prices)."""
        return int(self.stage1_epochs) + int(self.stage2_epochs)


def cosine_warmup(step: int, warmup: int, total: int) -> float:
    """``transformers.get_cosine_schedule_with_warmup`` (half a cosine): the factor of the base learning rate."""
    if step < warmup:
        return step / max(1, warmup)
    progress_ = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress_)))


def stage1_groups(model: BayesPfl, c: TrainConfig) -> list[dict]:
    """``train.py`` l.133-160: the parameter groups by name (shared modules under their first name)."""
    groups = {"prompt": [], "temperature": [], "pfl": [], "linear": []}
    for name, p in model.named_parameters():
        if "prompt" in name:
            groups["prompt"].append(p)
        elif "PFL" in name and "encoder" not in name and "decoder" not in name:
            groups["pfl"].append(p)
        elif "temperature" not in name:
            groups["linear"].append(p)
        else:
            groups["temperature"].append(p)
    return [{"params": groups["prompt"], "lr": c.lr_prompt}, {"params": groups["temperature"], "lr": c.lr_temperature},
            {"params": groups["pfl"], "lr": c.lr_pfl}, {"params": groups["linear"], "lr": c.lr_linear}]


def stage2_params(model: BayesPfl) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if any(k in n for k in ("class_mapping", "image_mapping", "fuse"))]


def flow_step(model: BayesPfl, g: torch.Tensor, gen: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One training-mode sample of the three flows: ``([z_image [B,D], z_normal [1,D], z_abnormal [1,D]],
    KL_context + KL_normal + KL_abnormal)``."""
    b, d = g.shape
    zs, kl = [], 0
    for flow in (model.PFL_context, model.PFL_normal, model.PFL_abnormal):
        mu, var, u, w, bias = flow.params(g) if flow is model.PFL_context else flow.params()
        z0 = sample(mu, var, torch.randn(mu.shape, generator=gen).to(mu.device))
        zk, log_det = planar_flows(z0, u, w, bias)
        zs.append(zk)
        kl = kl + kl_term(mu, var, z0, zk, log_det, b)
    return zs, kl


def stage1_loss(model, text, g, toks, labels, gt, p: int, grid) -> torch.Tensor:
    """CE of pair ``p``'s image logits + per layer focal + dice of pair ``p``'s upsampled softmax."""
    n = model.prompt_num
    logits = model.image_logits(text, g)
    loss = F.cross_entropy(torch.stack([logits[:, p], logits[:, p + n]], dim=1), labels)
    for layer, tok in enumerate(toks):
        pix = model.pixel_logits(text, tok, layer, grid)
        sel = F.interpolate(torch.stack([pix[:, p], pix[:, p + n]], dim=1), size=tuple(gt.shape[-2:]), mode="bilinear",
                            align_corners=True)
        probs = torch.softmax(sel, dim=1)
        loss = loss + focal_loss(probs, gt) + dice_loss(probs, gt)
    return loss


def _check(c: TrainConfig) -> None:
    if c.stage1_epochs < 1 or c.stage2_epochs < 0 or c.batch_size < 1 or c.schedule_epochs < 1:
        raise ValueError(f"bayes_pfl training: stage1_epochs ({c.stage1_epochs}) >= 1, stage2_epochs "
                         f"({c.stage2_epochs}) >= 0, batch_size ({c.batch_size}) and schedule_epochs >= 1 expected")
    if not 0 <= c.mosaic_p <= 1 or not 0 <= c.aug_p <= 1 or not 0 <= c.warmup < 1:
        raise ValueError(f"bayes_pfl training: mosaic_p ({c.mosaic_p}), aug_p ({c.aug_p}) in [0, 1] and warmup "
                         f"({c.warmup}) in [0, 1) expected")


def train_bayes_pfl(backbone, rows: list[dict], config: TrainConfig, out: str | Path, meta: dict | None = None) -> Path:
    """Both stages on ``rows`` (:func:`..april_gan.train.training_samples`); writes the checkpoint to ``out``."""
    c = config
    if not rows:
        raise ValueError("bayes_pfl training: no training images")
    _check(c)
    device, size, grid = backbone.device, backbone.resolution, backbone.grid
    names = list(backbone.layers)
    classes = sorted({r["category"] for r in rows})
    by_class = {k: [r for r in rows if r["category"] == k] for k in classes}
    with torch.random.fork_rng(devices=[]):  # init drawn from the config's seed
        torch.manual_seed(c.seed)
        model = BayesPfl(*dims_of(backbone), len(names), c.prompt_num, c.context_len, c.state_len, c.num_flows,
                         c.rca_heads).to(device).train()
    n_batches = -(-len(rows) // c.batch_size)
    total = n_batches * c.schedule_epochs
    opt1 = torch.optim.Adam(stage1_groups(model, c), lr=c.lr_linear, betas=tuple(c.betas))
    opt2 = torch.optim.Adam(stage2_params(model), lr=c.lr_linear, betas=tuple(c.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt1, lambda s: cosine_warmup(s, int(c.warmup * total), total))
    gen, rng = torch.Generator().manual_seed(c.seed), np.random.default_rng(c.seed)
    losses, stages, start = [], [], time.time()
    with ThreadPoolExecutor(max(1, int(c.workers))) as pool:
        for epoch in range(1, c.epochs + 1):
            stage = 1 if epoch <= c.stage1_epochs else 2
            order = torch.randperm(len(rows), generator=gen).tolist()
            sum_loss, steps = 0.0, 0

            def submit(a):  # rng draws in batch order, in this thread: independent of the worker count
                batch, specs = [rows[i] for i in order[a : a + c.batch_size]], []
                for r in batch:
                    pick = (mosaic_pick_anomalous(by_class[r["category"]], rng)
                            if c.mosaic_p > 0 and rng.random() < c.mosaic_p else [])
                    specs.append((pick or [r], draw_augmentation(rng, c) if c.augment else {}))
                labels = [bool(len(spec) > 1 or r["defect"] != "good") for (spec, _), r in zip(specs, batch)]
                return (batch, labels), [pool.submit(_load_sample, spec, aug, size) for spec, aug in specs]

            bar = progress(prefetched(list(range(0, len(order), c.batch_size)), submit), total=n_batches,
                           desc=f"bayes_pfl epoch {epoch}/{c.epochs} (stage {stage})", unit="batch")
            for (batch, labels), loaded in bar:
                x = backbone.preprocess([im for im, _ in loaded])
                gt = torch.stack([m for _, m in loaded]).to(device)
                labels = torch.tensor(labels, device=device).long()
                with torch.no_grad():
                    layers, cls = backbone.forward(x)
                    g = backbone.image_embedding(cls, normalize=False).float()
                    toks = [layers[k].float().reshape(len(batch), grid[0] * grid[1], -1) for k in names]
                tokens = class_tokens(backbone, [r["category"] for r in batch])
                p = int(rng.integers(c.prompt_num))
                with torch.set_grad_enabled(stage == 1):
                    (z, z_n, z_a), kl = flow_step(model, g, gen)
                    text = text_embeddings(model, backbone, tokens, z, z_n.expand(len(batch), -1),
                                           z_a.expand(len(batch), -1))
                if stage == 1:
                    loss = (stage1_loss(model, text, g, toks, labels, gt, p, grid) + c.kl_weight * kl
                            + orthogonal_loss(text, c.prompt_num))
                else:
                    logits = model.image_logits(text, g, toks)
                    loss = F.cross_entropy(torch.stack([logits[:, p], logits[:, p + c.prompt_num]], dim=1), labels)
                sum_loss, steps = sum_loss + optimizer_step(opt1 if stage == 1 else opt2, loss, bar), steps + 1
                sched.step()
            losses.append(sum_loss / steps)
            stages.append(stage)
            LOG.info("bayes_pfl epoch %d/%d (stage %d): mean loss %.5f (%d batches, %.1f s)", epoch, c.epochs, stage,
                     losses[-1], steps, time.time() - start)
            check_finite_loss("bayes_pfl", epoch, losses[-1])
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    info = training_info(c, losses, rows, backbone, start, meta, epoch_stages=stages, stage=2 if c.stage2_epochs else 1,
                         rca_heads=int(c.rca_heads))
    save_checkpoint(out, {CHECKPOINT_KEY: state}, info)
    LOG.info("bayes_pfl (%d images of %d classes, %d + %d epochs) -> %s", len(rows), len(classes), c.stage1_epochs,
             c.stage2_epochs, out)
    return Path(out)


def train_backend(backbone, root: str | Path, dataset: str, config: TrainConfig, out: str | Path, *,
                  text_cache: str | None = None) -> Path:
    """Trainer interface (:mod:`anorefiner.zsad.registry`); ``text_cache`` is unused (per-image text)."""
    rows = training_samples(root, dataset, config.max_images)
    return train_bayes_pfl(backbone, rows, config, out,
                           meta={"auxiliary_dataset": dataset, "auxiliary_root": str(root)})


def check_checkpoint(path: str | Path, backbone=None) -> None:
    """Trainer interface: every key and shape of the official layout, widths checked against the backbone."""
    load_model(path, backbone)
