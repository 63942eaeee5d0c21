"""Training of MVFA-AD's adapters on the k normal shots of a category (rule ``train_fewshot``).

Recipe (``MediaBrain-SJTU/MVFA-AD@a30bf7b`` ``train_few.py``, the defaults of :class:`TrainConfig`): the shots
are augmented 11-fold (:func:`..shots.augment_mvfa`) and shuffled each epoch, batch 1, 50 epochs; two Adam
optimisers (seg and det adapters) with lr 1e-3, betas (0.5, 0.999); per layer the det loss
``BCEWithLogits(mean_L softmax(100 d @ T)[abnormal], label)`` (the mean *probability* is the logit, as written,
l.124-130) plus, for datasets with masks, the seg loss focal + dice of ``softmax(bilinear_240(100 s @ T))``
against the mask (l.132-146, APRIL-GAN's losses); seed 111.

What differs (docs/backends.md): MVFA-AD's few-shot setting also trains on k *anomalous* images with masks of the
target dataset (``medical_few.py`` get_few_abnormal, the ``valid`` split); MVTec AD and VisA have none outside
their test split, and PA-CLIP's "4-shot" rows use k normal images, so the adapters see the k normal shots only
(label 0, empty masks). The official code also scores the test set after every epoch and keeps the best epoch;
the last epoch is kept here. fp32 instead of CUDA autocast.

Checkpoint: ``{"seg_adapters": ..., "det_adapters": ..., "meta": {..., "shots": [ids]}}`` (the official keys).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ...log import LOG, progress
from ..april_gan.train import dice_loss, focal_loss
from ..checkpoints import check_finite_loss, load_weights_only, save_checkpoint, training_info
from .backend import MvfaConfig, build_adapters, load_adapters, preprocess


@dataclass
class TrainConfig:
    """MVFA-AD adapter training (config ``backends.<name>.train.<dataset>``)."""

    epochs: int = 50  # --epoch
    image_size: int = 240  # --img_size: images resized to it, the backbone reads its top-left (238 px: 17 x 17)
    lr: float = 0.001  # --learning_rate
    betas: tuple = (0.5, 0.999)  # train_few.py l.71-72
    seed: int = 111  # --seed (adapter initialisation and the epochs' shuffling; the run seed draws the shots)
    features: list = field(default_factory=lambda: [6, 12, 18, 24])  # --features_list (1-based blocks)
    bottleneck: int | None = None  # adapter width; None = the text embedding width (768 for ViT-L/14)
    mix: tuple = (0.8, 0.1, 0.1)  # adapter.py l.71: x = 0.8 x + 0.1 seg + 0.1 det
    focal_gamma: float = 2.0  # loss.py FocalLoss
    focal_smooth: float = 1e-5
    dice_smooth: float = 1.0  # loss.py BinaryDiceLoss


def fewshot_loss(seg, det, text: torch.Tensor, mask: torch.Tensor, label: torch.Tensor, grid, size: int,
                 config: TrainConfig, temperature: float = 100.0) -> torch.Tensor:
    """``train_few.py`` l.122-148 for a batch: sum over layers of the det BCE and the seg focal + dice."""
    loss = 0
    for s, d in zip(seg, det):
        d = F.normalize(d[:, 1:], dim=-1)
        score = torch.softmax(temperature * d @ text.T, dim=-1)[..., 1].mean(-1)
        loss = loss + F.binary_cross_entropy_with_logits(score, label)
        s = F.normalize(s[:, 1:], dim=-1)
        logits = (temperature * s @ text.T).transpose(1, 2).reshape(s.shape[0], 2, *grid)
        probs = torch.softmax(F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True), dim=1)
        loss = loss + focal_loss(probs, mask, config.focal_gamma, config.focal_smooth)
        loss = loss + dice_loss(probs[:, 1], mask, config.dice_smooth)
    return loss


def train_fewshot(backbone, root, dataset: str, category: str, config: TrainConfig, out, *, k_shot: int, seed: int,
                  categories=None, text_cache=None) -> Path:
    """Trainer interface (few-shot): train the adapters on the augmented k shots drawn by ``seed``."""
    from ..prompts import text_embeddings
    from ..shots import TrainGood, augment_mvfa

    if config.epochs < 1:
        raise ValueError(f"mvfa_ad training: epochs must be >= 1, got {config.epochs}")
    opts, size = MvfaConfig(), int(config.image_size)
    if size < backbone.resolution:
        raise ValueError(f"mvfa_ad image_size {size} is below the backbone's {backbone.resolution} px")
    source = TrainGood(root, dataset, category)
    shots = source.draw(k_shot, seed, "mvfa_ad")
    device = backbone.device
    x = augment_mvfa(preprocess(source.load(shots), size, backbone.resolution))
    text = text_embeddings(backbone, category, opts.prompt_set, text_cache).to(device)
    adapters = build_adapters(backbone, text.shape[1], config.features, config.bottleneck, config.mix,
                              config.seed).to(device)
    opt_seg = torch.optim.Adam(adapters.seg_adapters.parameters(), lr=config.lr, betas=tuple(config.betas))
    opt_det = torch.optim.Adam(adapters.det_adapters.parameters(), lr=config.lr, betas=tuple(config.betas))
    mask = torch.zeros(1, size, size, device=device)  # normal shots: empty masks, label 0
    label = torch.zeros(1, device=device)
    gen = torch.Generator().manual_seed(config.seed)
    losses, start = [], time.time()
    for epoch in range(1, config.epochs + 1):
        total = 0.0
        for i in progress(torch.randperm(len(x), generator=gen).tolist(), desc=f"mvfa_ad epoch {epoch}", unit="img"):
            seg, det = adapters(backbone, x[i : i + 1].to(device))
            loss = fewshot_loss(seg, det, text, mask, label, backbone.grid, size, config, opts.temperature)
            opt_seg.zero_grad(set_to_none=True)
            opt_det.zero_grad(set_to_none=True)
            loss.backward()
            opt_seg.step()
            opt_det.step()
            total += float(loss.detach())
        losses.append(total / len(x))
        check_finite_loss("mvfa_ad", epoch, losses[-1])
    state = {k: v.detach().cpu().clone() for k, v in adapters.state_dict().items()}
    meta = {"dataset": dataset, "category": category, "k_shot": int(k_shot), "shots_seed": int(seed), "shots": shots,
            "text_dim": int(text.shape[1])}
    rows = [{"category": category, "image": i} for i in shots]
    save_checkpoint(out, {"seg_adapters": {k[13:]: v for k, v in state.items() if k.startswith("seg_adapters.")},
                          "det_adapters": {k[13:]: v for k, v in state.items() if k.startswith("det_adapters.")}},
                    training_info(config, losses, rows, backbone, start, meta))
    LOG.info("mvfa_ad adapters of %s/%s (%d shots x 11 views, seed %d, loss %.4f -> %.4f) -> %s", dataset, category,
             k_shot, seed, losses[0], losses[-1], out)
    return Path(out)


def check_checkpoint(path, backbone=None) -> None:
    """Trainer interface: the adapters load weights-only (with the backbone: their shapes fit it)."""
    obj = load_weights_only(path, "mvfa_ad checkpoint")
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), dict) for k in ("seg_adapters", "det_adapters")):
        raise ValueError(f"mvfa_ad checkpoint {path}: needs 'seg_adapters' and 'det_adapters'")
    if backbone is not None:
        load_adapters(path, backbone)
