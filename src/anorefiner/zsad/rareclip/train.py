"""Training of RareCLIP's text branch on the auxiliary dataset (``hy28hy/RareCLIP_v1@a8e6d46:train.py``).

Recipe (specs/backends.md section 3, "Training"; the defaults of :class:`TrainConfig`):

* trainable: only the 4 text-branch ``Linear(width -> D)`` adapters (D = the text embedding width),
  in APRIL-GAN's checkpoint format ``{"trainable_linearlayer": {fc.i.weight, fc.i.bias}}``
  (:class:`~.april_gan.LinearAdapters`, loaded by :func:`~.april_gan.load_adapters`);
* loss = MSE(cos(p, g), 1) over *all* projected tokens p of the 4 layers against the normalised
  global embedding g (``--feature_align 1``) + sum over layers of focal + dice at the input size, the
  map being ``softmax(upsample(20 * p @ T))`` (upsampled *then* softmaxed, unlike test time), T the
  class-agnostic text of :mod:`.rareclip`;
* Adam lr 5e-3, betas (0.5, 0.999), 5 epochs, batch 16, seed 42; the last epoch is saved;
* data: the auxiliary dataset's test split with masks. MVTec AD: ``transistor/misplaced`` and
  ``cable/missing_cable`` are dropped (also from the mosaics) and a 2x2 mosaic replaces a sample with
  p = 0.2; VisA: no augmentation. Those are options (``exclude_defects``, ``mosaic_p``) the config sets
  per auxiliary dataset; the defaults are VisA's.

Shared pieces come from :mod:`.april_gan_train` (focal/dice losses, samples, mosaics, mask resizing).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...log import LOG, progress
from ..april_gan.backend import CHECKPOINT_KEY, LinearAdapters, layer_logits, layer_probs, load_adapters
from ..april_gan.train import (_load_sample, mosaic_pick, optimizer_step, prefetched, segmentation_loss,
                              training_samples)
from ..checkpoints import check_finite_loss, save_checkpoint, training_info

#: MVTec AD defect types train.py leaves out (the integrator sets them for mvtec_ad)
MVTEC_EXCLUDED = ("transistor/misplaced", "cable/missing_cable")


@dataclass
class TrainConfig:
    """Text-branch training options (config ``backends.<name>.train.<auxiliary dataset>``)."""

    epochs: int = 5  # train.sh --epoch 5
    batch_size: int = 16  # train.sh --batch_size 16
    lr: float = 5e-3  # train.sh --learning_rate 0.005
    betas: tuple = (0.5, 0.999)  # train.py Adam
    seed: int = 42  # train.py setup_seed(42)
    mosaic_p: float = 0.0  # dataset.py aug_rate: 0.2 on MVTec AD, none on VisA
    exclude_defects: tuple = ()  # "category/defect" rows dropped: MVTEC_EXCLUDED on MVTec AD, none on VisA
    text_layers: tuple = ("12", "16", "20", "24")  # --features_list_text (backbone layer names)
    temperature: float = 20.0  # --text_temp
    align_weight: float = 1.0  # --feature_align 1: the MSE(cos, 1) term is added with weight 1
    focal_gamma: float = 2.0  # loss.py FocalLoss (APRIL-GAN's)
    focal_smooth: float = 1e-5
    dice_smooth: float = 1.0
    max_images: int | None = None  # cap per category (smoke runs); None = the whole test split
    autocast: bool = True  # train.py runs CLIP under torch.cuda.amp.autocast (CUDA only; CPU stays fp32)
    workers: int = 4  # image-decoding threads per batch; the result does not depend on it


def filter_rows(rows: list[dict], exclude: tuple) -> list[dict]:
    """Drop the rows whose ``category/defect`` is in ``exclude`` (each entry must be ``cat/defect``)."""
    bad = [e for e in exclude if not isinstance(e, str) or e.count("/") != 1]
    if bad:
        raise ValueError(f"rareclip training: exclude_defects entries {bad} are not 'category/defect'")
    drop = set(exclude)
    return [r for r in rows if f"{r['category']}/{r['defect']}" not in drop]


def align_loss(projected: list[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """``MSE(cos(p, g), 1)`` over all tokens of all layers: ``p [B, L, D]`` normalised, ``g [B, D]``."""
    cos = torch.cat([(p * F.normalize(g, dim=-1).unsqueeze(1)).sum(-1) for p in projected], dim=1)
    return ((cos - 1) ** 2).mean()


def train_text_branch(backbone, rows: list[dict], config: TrainConfig, out: str | Path,
                      text_cache: str | None = None, meta: dict | None = None) -> Path:
    """Train the 4 text adapters on ``rows`` and write the checkpoint (official format + ``meta``)."""
    from .backend import text_embeddings

    c = config
    rows = filter_rows(rows, tuple(c.exclude_defects))
    if not rows:
        raise ValueError("rareclip training: no training images")
    if not 0 <= c.mosaic_p <= 1:
        raise ValueError(f"rareclip training: mosaic_p must lie in [0, 1], got {c.mosaic_p}")
    names = [str(k) for k in c.text_layers]
    missing = [k for k in names if k not in backbone.layers]
    if missing:
        raise ValueError(f"rareclip training: text_layers {missing} are not backbone layers {list(backbone.layers)}")
    device = backbone.device
    text = text_embeddings(backbone, text_cache).to(device)
    gen = torch.Generator().manual_seed(c.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c.seed)
        adapters = LinearAdapters(backbone.width, text.shape[-1], len(names)).to(device)
    opt = torch.optim.Adam(adapters.parameters(), lr=c.lr, betas=tuple(c.betas))
    rng = np.random.default_rng(c.seed)
    by_class: dict[str, list[dict]] = {}
    for r in rows:
        by_class.setdefault(r["category"], []).append(r)
    size, grid = backbone.resolution, backbone.grid
    losses, start = [], time.time()
    use_amp = c.autocast and device.type == "cuda"
    with ThreadPoolExecutor(max(1, int(c.workers))) as pool:
        for epoch in range(1, c.epochs + 1):
            order = torch.randperm(len(rows), generator=gen).tolist()
            starts = list(range(0, len(order), c.batch_size))
            total, steps = 0.0, 0

            def submit(a):  # rng drawn here, in batch order: the result does not depend on the pool
                batch = [rows[i] for i in order[a : a + c.batch_size]]
                specs = [mosaic_pick(by_class[r["category"]], rng) if c.mosaic_p > 0 and rng.random() < c.mosaic_p
                         else [r] for r in batch]
                return batch, [pool.submit(_load_sample, spec, size) for spec in specs]

            bar = progress(prefetched(starts, submit), total=len(starts), desc=f"rareclip epoch {epoch}/{c.epochs}",
                           unit="batch")
            for batch, loaded in bar:
                x = backbone.preprocess([im for im, _ in loaded])
                gt = torch.stack([m for _, m in loaded]).to(device)
                with torch.no_grad(), torch.autocast("cuda", enabled=use_amp):
                    layers, cls = backbone.forward(x)
                    g = torch.as_tensor(backbone.image_embedding(cls.float(), normalize=True)).float().to(device)
                toks = [layers[k].float().reshape(len(batch), grid[0] * grid[1], -1) for k in names]
                projected = adapters(toks)
                loss = c.align_weight * align_loss(projected, g) + segmentation_loss(
                    [layer_probs(layer_logits(p, text, grid, c.temperature), size) for p in projected], gt, c)
                total, steps = total + optimizer_step(opt, loss, bar), steps + 1
            losses.append(total / max(steps, 1))
            LOG.info("rareclip epoch %d/%d: mean loss %.5f (%d batches, %.1f s)", epoch, c.epochs, losses[-1], steps,
                     time.time() - start)
            check_finite_loss("rareclip", epoch, losses[-1])
    state = {k: v.detach().cpu().clone() for k, v in adapters.state_dict().items()}
    save_checkpoint(out, {CHECKPOINT_KEY: state}, training_info(c, losses, rows, backbone, start, meta,
                                                                 text_layers=names))
    LOG.info("rareclip text adapters (%d images, %d epochs) -> %s", len(rows), c.epochs, out)
    return Path(out)


def train_backend(backbone, root: str | Path, dataset: str, config: TrainConfig, out: str | Path, *,
                  text_cache: str | None = None) -> Path:
    """Trainer interface (:mod:`anorefiner.zsad.registry`): train on ``root``'s test split."""
    rows = training_samples(root, dataset, config.max_images)
    return train_text_branch(backbone, rows, config, out, text_cache=text_cache,
                             meta={"auxiliary_dataset": dataset, "auxiliary_root": str(root)})


def check_checkpoint(path: str | Path, backbone=None) -> None:
    """Trainer interface: 4 adapters (the official text layers 12/16/20/24) taking the backbone's token width."""
    n = len(TrainConfig().text_layers)
    load_adapters(path, n, None if backbone is None else getattr(backbone, "width", None), what="rareclip")
