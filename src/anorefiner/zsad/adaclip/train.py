"""Training of AdaCLIP's hybrid prompts and heads on the auxiliary dataset (``AdaCLIP train.py``,
``method/trainer.py`` AdaCLIP_Trainer; specs/tta.md Part B.2, the defaults of :class:`TrainConfig`).

* data: the test split with masks of every category of the auxiliary dataset
  (:func:`.april_gan_train.training_samples`), squash-resized like at test time, masks bilinear ``> 0.5``.
  The paper trains on MVTec AD + ColonDB (-> VisA) or VisA + ClinicDB (-> MVTec AD); the medical sets are
  not part of this pipeline, so the industrial auxiliary dataset is used ALONE;
* frozen CLIP; the whole forward of :func:`.adaclip.adaclip_forward` with gradients into the prompts
  and heads (HSF included, as the official forward with ``use_hsf``); loss = focal(image probs, label)
  + sum over layers [focal(map probs, gt) + dice(p_abn, gt) + dice(p_norm, 1 - gt)], softmax PER layer of
  the upsampled logits (``aggregation=False``); focal/dice are APRIL-GAN's ``loss.py`` (same file);
* AdamW lr 0.01, betas (0.5, 0.999), weight decay 0.01 (AdamW's default), 5 epochs, batch 1 (the
  official text path only broadcasts one image's dynamic prompts: larger batches raise), seed 111;
  fp32 (the official CUDA fp16 autocast without a GradScaler is documented as unstable), but the forward's
  own precision choices are the backend's (prompts rounded to fp16, plain-bicubic position embedding);
* exactly ``epochs`` epochs: no per-epoch validation on the target set and no best-pixel-F1 checkpoint
  selection (that would select on the evaluation data).

The checkpoint holds the official keys (``clip_model.text_prompter.static_prompts.0`` ...) plus a ``meta``
dict of plain values, written atomically, loadable with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...log import LOG, progress
from ...backbones.clip_vit import with_pos_embed
from .backend import AdaClipConfig, adaclip_forward, check_precision_options, class_bank
from .prompts import AdaClipModel, load_model, state_for_checkpoint
from ..april_gan.backend import layer_probs
from ..april_gan.train import _load_sample, focal_loss, optimizer_step, segmentation_loss, training_samples
from ..checkpoints import check_finite_loss, save_checkpoint, training_info


@dataclass
class TrainConfig:
    """Prompt training options (config ``backends.<name>.train.<auxiliary dataset>``; same for both sets)."""

    epochs: int = 5  # train.py --epoch 5
    lr: float = 0.01  # train.py --learning_rate 0.01
    betas: tuple = (0.5, 0.999)  # trainer.py AdamW betas
    weight_decay: float = 0.01  # trainer.py AdamW without weight_decay = torch's default 0.01
    batch_size: int = 1  # train.py --batch_size 1; trainer.py supports only 1
    seed: int = 111  # train.py setup_seed(111); also the KMeans seed of HSF during training
    prompt_length: int = 5  # train.py --prompting_length 5
    prompt_depth: int = 4  # train.py --prompting_depth 4
    use_hsf: bool = True  # train.py --use_hsf True (HSF runs in the training forward too)
    k_clusters: int = 20  # train.py --k_clusters 20
    hsf_alpha: float = 0.2  # adaclip.py alpha
    kmeans_n_init: int = 1  # sklearn n_init="auto" (= 1 for k-means++)
    cls_input: str = "prompted"  # as the backend option (official: the prompted forward's pooled feature)
    pos_embed: str = "bicubic_no_antialias"  # as the backend option (official: method/clip_model.py resize)
    prompt_precision: str = "float16"  # as the backend option (official: the prompts' .half() casts)
    temperature: float = 100.0  # adaclip.py: fixed 100
    focal_gamma: float = 2.0  # loss.py FocalLoss
    focal_smooth: float = 1e-5  # loss.py FocalLoss
    dice_smooth: float = 1.0  # loss.py BinaryDiceLoss
    max_images: int | None = None  # cap per category (smoke runs); None = the whole test split


def _forward_config(c: TrainConfig) -> AdaClipConfig:
    return AdaClipConfig(prompt_length=c.prompt_length, prompt_depth=c.prompt_depth, temperature=c.temperature,
                         use_hsf=c.use_hsf, k_clusters=c.k_clusters, hsf_alpha=c.hsf_alpha,
                         kmeans_n_init=c.kmeans_n_init, cls_input=c.cls_input, pos_embed=c.pos_embed,
                         prompt_precision=c.prompt_precision)


def sample_loss(out: dict, gt: torch.Tensor, label: torch.Tensor, size: int, c: TrainConfig) -> torch.Tensor:
    """``trainer.py`` train_one_batch: focal on the image probs + per layer focal + two dice terms."""
    image = focal_loss(out["probs"][:, :, None, None], label[:, None, None], c.focal_gamma, c.focal_smooth)
    return image + segmentation_loss([layer_probs(lg, size) for lg in out["logits"]], gt, c, normal_dice=True)


def train_prompts(backbone, rows: list[dict], config: TrainConfig, out: str | Path, meta: dict | None = None) -> Path:
    """Train the prompts and heads on ``rows`` (``training_samples``) and write the checkpoint to ``out``."""
    c = config
    if not rows:
        raise ValueError("adaclip training: no training images")
    if c.batch_size != 1:
        raise ValueError(f"adaclip training: batch_size {c.batch_size} is not supported (the official trainer "
                         "runs batch 1 only: its text prompts broadcast one image's dynamic prompts)")
    if c.epochs < 1:
        raise ValueError(f"adaclip training: epochs must be >= 1, got {c.epochs}")
    fwd = _forward_config(c)
    check_precision_options(fwd)
    backbone = with_pos_embed(backbone, c.pos_embed)
    device = backbone.device
    classes = sorted({r["category"] for r in rows})
    banks = {k: class_bank(backbone, k) for k in classes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c.seed)  # static prompts N(0, 0.02) and default Linear init from the config's seed
        model = AdaClipModel.for_backbone(backbone, c.prompt_length, c.prompt_depth).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
    gen = torch.Generator().manual_seed(c.seed)
    size = backbone.resolution
    losses = []
    start = time.time()
    step = 0
    for epoch in range(1, c.epochs + 1):
        order = torch.randperm(len(rows), generator=gen).tolist()
        total = 0.0
        bar = progress(order, desc=f"adaclip epoch {epoch}/{c.epochs}", unit="image")
        for i in bar:
            row = rows[i]
            img, mask = _load_sample([row], size)
            x = backbone.preprocess([img])
            gt = mask.to(device)[None]
            label = torch.tensor([0.0 if row["defect"] == "good" else 1.0], device=device)  # index.py's label
            res = adaclip_forward(backbone, model, banks[row["category"]], x, fwd, c.seed)
            loss = sample_loss(res, gt, label, size, c)
            total, step = total + optimizer_step(opt, loss, bar), step + 1
        losses.append(total / len(order))
        LOG.info("adaclip epoch %d/%d: mean loss %.5f (%d images, %.1f s)", epoch, c.epochs, losses[-1], len(order),
                 time.time() - start)
        check_finite_loss("adaclip", epoch, losses[-1])
    info = training_info(c, losses, rows, backbone, start, meta, selection="last epoch (no target-set selection)")
    save_checkpoint(out, state_for_checkpoint(model), info)
    LOG.info("adaclip prompts (%d images of %d classes, %d epochs) -> %s", len(rows), len(classes), c.epochs, out)
    return Path(out)


def train_backend(backbone, root: str | Path, dataset: str, config: TrainConfig, out: str | Path, *,
                  text_cache: str | None = None) -> Path:
    """Trainer interface (:mod:`anorefiner.zsad.registry`); ``text_cache`` is unused (per-image text)."""
    rows = training_samples(root, dataset, config.max_images)
    return train_prompts(backbone, rows, config, out,
                         meta={"auxiliary_dataset": dataset, "auxiliary_root": str(root),
                               "auxiliary_note": "industrial auxiliary set alone (no ColonDB/ClinicDB)"})


def check_checkpoint(path: str | Path, backbone=None) -> None:
    """Trainer interface: keys and shapes are the official ones (and the backbone's widths/layers)."""
    load_model(path, backbone)

