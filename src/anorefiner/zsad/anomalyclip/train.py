"""Training of AnomalyCLIP's prompt learner on the auxiliary dataset (``zqhang/AnomalyCLIP@45ed4dd`` ``train.py``).

Recipe (specs/tta.md Part B.1, "Training"; the defaults of :class:`TrainConfig`):

* data: the full *test split with masks* of every category of the auxiliary dataset (VisA-trained prompts
  score MVTec AD and vice versa), squash-resized like at test time, no augmentation; label = not "good";
* frozen CLIP: the dual-path image features under ``no_grad`` (:mod:`.anomalyclip_dpam`); only the prompt
  learner's parameters are optimised (the unused compound projections get no gradient, so Adam leaves them);
* per step: text t from the learned prompts (with gradients); image loss = CE(cos(g, t) / 0.07, label);
  per map layer: probs = bilinear(softmax(cos(f, t) / 0.07)) at the input size; loss = CE +
  ``lambda`` * sum over layers [focal(probs, gt) + dice(p_abn, gt) + dice(p_norm, 1 - gt)], lambda = 4,
  focal gamma 2 / smooth 1e-5, dice smooth 1 (``loss.py``, the same as APRIL-GAN's: reused);
* Adam lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs, seed 111; the checkpoint is the last epoch's.

The checkpoint ``{"prompt_learner": state_dict, "meta": {...}}`` uses the official names, is written
atomically and loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...log import LOG, progress
from .backend import CHECKPOINT_KEY, PromptLearner, encode_text, load_prompt_learner, patch_probs, upsample_probs
from .dpam import (default_dpam_layer, dpam_start, dual_path_forward, global_feature, project_tokens,
                               with_position_embedding)
from ..april_gan.train import _load_sample, prefetched, segmentation_loss, training_samples
from ..checkpoints import check_finite_loss, load_weights_only, save_checkpoint, training_info


@dataclass
class TrainConfig:
    """Prompt-learner training options (config ``backends.<name>.train.<auxiliary dataset>``)."""

    epochs: int = 15  # train.sh --epoch 15 (both auxiliary datasets); the checkpoint is epoch 15's
    lr: float = 1e-3  # train.py --learning_rate default
    betas: tuple = (0.5, 0.999)  # train.py Adam
    batch_size: int = 8  # train.sh --batch_size 8
    seed: int = 111  # train.py setup_seed(111); also draws the prompt initialisation
    n_ctx: int = 12  # train.sh --n_ctx 12
    depth: int = 9  # train.sh --depth 9
    t_n_ctx: int = 4  # train.sh --t_n_ctx 4
    dpam_layer: int | None = None  # None: train.py's DPAM_layer=20 on 24 blocks (default_dpam_layer elsewhere)
    map_layers: tuple = ()  # () = the last block (--features_list 24 after the 2025-04-13 fix)
    temperature: float = 0.07  # train.py: logits / 0.07
    lam: float = 4.0  # train.py lam = 4 (since 2025-04-13; 1 before)
    pos_embed: str = "bilinear"  # AnomalyCLIP.py L363-370 (plain bilinear resize); "backbone": the backbone's
    compound_fp16: bool = True  # the official .half() cast of the compound prompts
    focal_gamma: float = 2.0  # loss.py FocalLoss
    focal_smooth: float = 1e-5  # loss.py FocalLoss
    dice_smooth: float = 1.0  # loss.py BinaryDiceLoss
    max_images: int | None = None  # cap per category (smoke runs); None = the whole test split
    workers: int = 4  # image-decoding threads; the result does not depend on it


def step_loss(probs: list[torch.Tensor], logits: torch.Tensor, labels: torch.Tensor, gt: torch.Tensor,
              config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel loss * lam, image CE)`` of upsampled per-layer probabilities ``[B, 2, S, S]`` and image logits."""
    image_loss = F.cross_entropy(logits, labels.long())
    return config.lam * segmentation_loss(probs, gt, config, normal_dice=True), image_loss


def _check(config: TrainConfig, backbone) -> list[int]:
    c = config
    n_blocks = len(backbone.blocks)
    dpam_start(n_blocks, c.dpam_layer)
    layers = [int(v) for v in (c.map_layers or [n_blocks])]
    if any(not 1 <= v <= n_blocks for v in layers):
        raise ValueError(f"anomalyclip training: map_layers {list(c.map_layers)} are not blocks 1..{n_blocks}")
    if c.epochs < 1 or c.batch_size < 1:
        raise ValueError(f"anomalyclip training: epochs={c.epochs} and batch_size={c.batch_size} must be >= 1")
    return layers


def train_prompts(backbone, rows: list[dict], config: TrainConfig, out: str | Path, meta: dict | None = None) -> Path:
    """Train the prompt learner on ``rows`` (:func:`training_samples`) and write the checkpoint to ``out``."""
    c = config
    if not rows:
        raise ValueError("anomalyclip training: no training images")
    layers = _check(c, backbone)
    n_blocks = len(backbone.blocks)
    dpam_layer = default_dpam_layer(n_blocks) if c.dpam_layer is None else int(c.dpam_layer)
    visual = with_position_embedding(backbone, c.pos_embed)
    device = backbone.device
    learner = PromptLearner(backbone, c.n_ctx, c.depth, c.t_n_ctx, seed=c.seed).to(device).train()
    trained = [learner.ctx_pos, learner.ctx_neg, *learner.compound_prompts_text]
    opt = torch.optim.Adam(trained, lr=c.lr, betas=tuple(c.betas))
    gen = torch.Generator().manual_seed(c.seed)
    size, (gh, gw) = backbone.resolution, backbone.grid
    losses, image_losses = [], []
    start = time.time()
    with ThreadPoolExecutor(max(1, int(c.workers))) as pool:
        for epoch in range(1, c.epochs + 1):
            order = torch.randperm(len(rows), generator=gen).tolist()
            starts = list(range(0, len(order), c.batch_size))
            total, total_img, steps = 0.0, 0.0, 0

            def submit(a):
                batch = [rows[i] for i in order[a : a + c.batch_size]]
                return batch, [pool.submit(_load_sample, [r], size) for r in batch]

            bar = progress(prefetched(starts, submit), total=len(starts),
                           desc=f"anomalyclip epoch {epoch}/{c.epochs}", unit="batch")
            for batch, loaded in bar:
                x = backbone.preprocess([im for im, _ in loaded])
                gt = torch.stack([m for _, m in loaded]).to(device)
                labels = torch.tensor([r["defect"] != "good" for r in batch], device=device)
                with torch.no_grad():
                    streams, last = dual_path_forward(visual, x, tuple(layers), dpam_layer)
                    feats = [project_tokens(backbone, streams[k])[:, 1:].reshape(len(batch), gh, gw, -1).float()
                             for k in layers]
                    glob = global_feature(backbone, last).float()
                text = encode_text(backbone, learner, c.compound_fp16)
                probs = [upsample_probs(patch_probs(f, text, c.temperature), size) for f in feats]
                logits = glob @ text.T / c.temperature
                pix, img = step_loss(probs, logits, labels, gt, c)
                opt.zero_grad(set_to_none=True)
                (pix + img).backward()
                opt.step()
                total, total_img, steps = total + float(pix.detach()), total_img + float(img.detach()), steps + 1
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{float(pix.detach()):.4f}", image_loss=f"{float(img.detach()):.4f}")
            losses.append(total / steps)
            image_losses.append(total_img / steps)
            LOG.info("anomalyclip epoch %d/%d: loss %.5f, image loss %.5f (%d batches, %.1f s)", epoch, c.epochs,
                     losses[-1], image_losses[-1], steps, time.time() - start)
            check_finite_loss("anomalyclip", epoch, losses[-1] + image_losses[-1])
    classes = sorted({r["category"] for r in rows})
    info = training_info(c, losses, rows, backbone, start, meta, dpam_layer=dpam_layer,
                         epoch_image_losses=[float(v) for v in image_losses], map_layers=[int(v) for v in layers])
    state = {k: v.detach().cpu().clone() for k, v in learner.state_dict().items()}
    save_checkpoint(out, {CHECKPOINT_KEY: state}, info)
    LOG.info("anomalyclip prompts (%d images of %d classes, %d epochs) -> %s", len(rows), len(classes), c.epochs, out)
    return Path(out)


def train_backend(backbone, root: str | Path, dataset: str, config: TrainConfig, out: str | Path, *,
                  text_cache: str | None = None) -> Path:
    """Trainer interface (:mod:`anorefiner.zsad.registry`): train on ``root``'s test split (``text_cache``
    is unused: the text is learned)."""
    rows = training_samples(root, dataset, config.max_images)
    return train_prompts(backbone, rows, config, out, meta={"auxiliary_dataset": dataset, "auxiliary_root": str(root)})


def check_checkpoint(path: str | Path, backbone=None, config: TrainConfig | None = None) -> None:
    """Trainer interface: the prompt learner loads weights-only with the backbone's widths (official names).

    The prompt sizes are ``config``'s, else the file's own. Without a backbone only the file, the
    ``prompt_learner`` key, the official key names and the context shapes are checked.
    """
    n_ctx, depth, t_n_ctx = ((config.n_ctx, config.depth, config.t_n_ctx) if config is not None
                             else file_prompt_sizes(path))
    if backbone is not None:
        load_prompt_learner(path, backbone, n_ctx, depth, t_n_ctx)
        return
    state = _state(path)
    required = {"ctx_pos", "ctx_neg", "token_prefix_pos", "token_suffix_pos", "tokenized_prompts_pos",
                "token_prefix_neg", "token_suffix_neg", "tokenized_prompts_neg"}
    required |= {f"compound_prompts_text.{i}" for i in range(depth - 1)}
    missing = sorted(required - set(state))
    if missing:
        raise ValueError(f"anomalyclip checkpoint {path}: missing keys {missing[:6]}")
    shape = tuple(state["ctx_pos"].shape)
    if len(shape) != 4 or shape[2] != n_ctx or tuple(state["ctx_neg"].shape) != shape:
        raise ValueError(f"anomalyclip checkpoint {path}: ctx_pos/ctx_neg have shapes {shape}/"
                         f"{tuple(state['ctx_neg'].shape)}, expected (1, 1, {n_ctx}, width)")


def _state(path: str | Path) -> dict:
    obj = load_weights_only(path, "anomalyclip checkpoint")
    state = obj.get(CHECKPOINT_KEY) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"anomalyclip checkpoint {path}: no {CHECKPOINT_KEY!r} state dict")
    return state


def file_prompt_sizes(path: str | Path) -> tuple[int, int, int]:
    """``(n_ctx, depth, t_n_ctx)`` of a prompt-learner file, read from its shapes (errors name the file)."""
    state = _state(path)
    if "ctx_pos" not in state or not torch.is_tensor(state["ctx_pos"]) or state["ctx_pos"].ndim != 4:
        raise ValueError(f"anomalyclip checkpoint {path}: no 4-d 'ctx_pos' in {CHECKPOINT_KEY!r}")
    compound = [k for k in state if k.startswith("compound_prompts_text.")]
    t_n_ctx = int(state["compound_prompts_text.0"].shape[0]) if "compound_prompts_text.0" in state else 0
    return int(state["ctx_pos"].shape[-2]), len(compound) + 1, t_n_ctx
