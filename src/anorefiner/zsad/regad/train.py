"""RegAD's meta-training on the dataset's *other* categories (rule ``train_fewshot``, one network per scored
category and shot count, ``MediaBrain-SJTU/RegAD@5e2c1f8`` ``train.py`` and ``datasets/mvtec.py``).

Recipe (the defaults of :class:`TrainConfig`): the network (:class:`.model.StnResNet` from ImageNet ResNet-18,
``rotation_scale`` transforms, :class:`.model.Encoder`, :class:`.model.Predictor`) learns feature registration
on the ``train/good`` images of every category but the scored one (``FSAD_Dataset_train``: leave-one-out). Each
epoch the images of each category are shuffled and cut into batches of 32 queries; every query gets ``k``
supports drawn uniformly from the same category, never itself (``shuffle_dataset`` l.78-116); the batches of all
categories are visited in random order. Per batch: ``z_q = ENC(STN(query))``, ``z_s = ENC(mean_k STN(support))``,
loss ``cos_loss(PRED(z_q), z_s) / 2 + cos_loss(PRED(z_s), z_q) / 2`` (stop-gradient on the targets); three SGD
optimisers, lr 1e-4, momentum 0.9, the rate set before epoch e to ``1e-4 x 0.5 (1 + cos(pi e / E))``
(``adjust_learning_rate``), 50 epochs, images 224 px unnormalised, seed 668.

Not reproduced: the official loop evaluates on the *scored* category's test set before every epoch (with its
fixed support sets) and keeps the epoch with the best image + pixel AUROC, the untrained network included; here
the last epoch is kept. The images are decoded and resized once (the official reloads them every epoch: no
augmentation, the same tensors).

Checkpoint: ``{"STN", "ENC", "PRED", "meta"}`` (the official keys), loaded weights-only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...log import LOG, progress
from ..checkpoints import check_finite_loss, load_weights_only, save_checkpoint, training_info
from .backend import preprocess
from .model import cos_loss, load_networks, networks


@dataclass
class TrainConfig:
    """RegAD meta-training (config ``backends.<name>.train.<dataset>``)."""

    epochs: int = 50  # train.py --epochs
    batch_size: int = 32  # --batch_size: queries per batch, all of one category
    lr: float = 1e-4  # --lr
    momentum: float = 0.9  # --momentum
    image_size: int = 224  # --img_size (STN sizes follow it)
    stn_mode: str = "rotation_scale"  # --stn_mode (the published checkpoints' mode)
    seed: int = 668  # --seed
    max_images: int | None = None  # per training category (smoke runs); None = every train/good image


def cosine_lr(lr: float, epoch: int, epochs: int) -> float:
    """``adjust_learning_rate`` (train.py l.317-322): the rate of epoch ``epoch`` (1-based; the last one is 0)."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def batches(sizes: dict[str, int], batch: int, k: int, rng: np.random.Generator) -> list[tuple[str, list, list]]:
    """``shuffle_dataset``: per category a shuffled order cut into query batches, each query with ``k`` supports
    of its category drawn uniformly among the other images; all batches in random order."""
    out = []
    for cat, n in sizes.items():
        if n < 2:
            raise ValueError(f"regad training: category {cat!r} has {n} train/good image(s); supports need 2")
        order = rng.permutation(n).tolist()
        for a in range(0, n, batch):
            queries = order[a : a + batch]
            supports = [[int(j) if j < q else int(j) + 1 for j in rng.integers(0, n - 1, size=k)] for q in queries]
            out.append((cat, queries, supports))
    return [out[i] for i in rng.permutation(len(out))]


def train_fewshot(backbone, root, dataset: str, category: str, config: TrainConfig, out, *, k_shot: int, seed=None,
                  categories=None, text_cache=None) -> Path:
    """Trainer interface (few-shot): train on the other ``categories`` of ``dataset`` (their train/good images)."""
    from ...data.index import index_category, list_categories, load_image

    if config.epochs < 1 or k_shot < 1:
        raise ValueError(f"regad training: epochs and k_shot must be >= 1 (got {config.epochs}, {k_shot})")
    others = [c for c in (categories or list_categories(root)) if c != category]
    if not others:
        raise ValueError(f"regad trains on the other categories of {dataset!r}, but {category!r} is the only one")
    device = backbone.device
    images = {}
    for cat in others:
        paths = list(index_category(root, cat, dataset=dataset, split="train")["image_path"])[: config.max_images]
        images[cat] = (preprocess([load_image(p) for p in paths], config.image_size) * 255).round().to(torch.uint8)
    nets = {k: v.to(device).train()
            for k, v in networks(backbone, config.image_size, config.stn_mode, config.seed).items()}
    opts = {k: torch.optim.SGD(v.parameters(), lr=config.lr, momentum=config.momentum) for k, v in nets.items()}
    rng = np.random.default_rng(config.seed)
    losses, start = [], time.time()
    for epoch in range(1, config.epochs + 1):
        lr = cosine_lr(config.lr, epoch, config.epochs)
        for opt in opts.values():
            for group in opt.param_groups:
                group["lr"] = lr
        total, steps = 0.0, 0
        plan = batches({c: len(v) for c, v in images.items()}, config.batch_size, k_shot, rng)
        for cat, q, s in progress(plan, desc=f"regad epoch {epoch}/{config.epochs}", unit="batch"):
            query = images[cat][q].to(device).float() / 255.0
            support = images[cat][torch.tensor(s).flatten()].to(device).float() / 255.0
            fq = nets["STN"](query)
            fs = nets["STN"](support).reshape(len(q), k_shot, *fq.shape[1:]).mean(1)  # sum of feat / K
            z1, z2 = nets["ENC"](fq), nets["ENC"](fs)
            loss = cos_loss(nets["PRED"](z1), z2) / 2 + cos_loss(nets["PRED"](z2), z1) / 2
            for opt in opts.values():
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in opts.values():
                opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        losses.append(total / max(steps, 1))
        check_finite_loss("regad", epoch, losses[-1])
        LOG.info("regad epoch %d/%d: lr %.2e, mean loss %.5f (%d batches)", epoch, config.epochs, lr, losses[-1], steps)
    state = {k: {n: t.detach().cpu().clone() for n, t in v.state_dict().items()} for k, v in nets.items()}
    rows = [{"category": c, "image": i} for c, v in images.items() for i in range(len(v))]
    meta = {"dataset": dataset, "category": category, "k_shot": int(k_shot), "trained_on": others}
    save_checkpoint(out, state, training_info(config, losses, rows, backbone, start, meta))
    LOG.info("regad for %s/%s: trained on %d images of %s (%d epochs) -> %s", dataset, category, len(rows), others,
             config.epochs, out)
    return Path(out)


def check_checkpoint(path, backbone=None) -> None:
    """Trainer interface: the three networks load weights-only (with the backbone: every shape fits)."""
    obj = load_weights_only(path, "regad checkpoint")
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), dict) for k in ("STN", "ENC", "PRED")):
        raise ValueError(f"regad checkpoint {path}: needs 'STN', 'ENC' and 'PRED'")
    if backbone is not None:
        load_networks(path, backbone)
