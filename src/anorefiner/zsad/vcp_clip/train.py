"""Training of VCP-CLIP on the auxiliary dataset (``VCP-CLIP train.py``, ``train.sh``, ``utils/dataset.py``).

Recipe (specs/backends.md section 2, "Training recipe"; the defaults of :class:`TrainConfig`):

* data: the auxiliary dataset's *test split with masks*, every category (``group_id_list 2``); squash-resized
  like at test time; masks binarised, resized bilinearly, ``> 0.5`` (:func:`.april_gan_train.resize_mask`);
* MVTec as the auxiliary set: with probability ``mosaic_p`` = 0.2 a sample is replaced by a 2x2 mosaic of 4
  random **anomalous** test images of its class (``MVTecDataset.combine_img`` picks from the merged
  ``anomaly`` folder; APRIL-GAN's also draws good images);
* augmentations (albumentations in the official code, own numpy/PIL code here, each p = 0.5, after the
  mosaic): Rotate(+-30, linear, reflect-101 border; masks nearest), RandomRotate90, RandomBrightnessContrast
  (+-0.2), GaussNoise (variance 10..50), OneOf[Blur(3), ColorJitter(0.2 each), GaussianBlur(3..7)];
  geometric ones hit image and mask alike;
* forward under CUDA autocast (``train.py``; fp32 parameters, no grad scaler), losses in fp32; frozen CLIP; the
  trainable parts (:class:`.vcp_clip.VcpModel`) in train mode (prompt dropout on); loss =
  sum over the 4 layers of focal + dice of both branches (``utils/loss.py``, as APRIL-GAN's);
* Adam, betas (0.5, 0.999), two groups: ``lr`` for everything but the temperatures (4e-5 on VisA, 2e-5 on
  MVTec: config ``backends.vcp_clip.train.<dataset>.lr``), ``temperature_lr`` 0.01 for ``prompt_temp`` and
  ``prompt_temp_l1``; 10 epochs, batch 32, seed 333; exactly ``epochs`` epochs (the official per-epoch
  evaluation on target-set classes selects nothing here; README uses the last epoch).

The checkpoint is the official layout plus a ``meta`` dict of plain values, written atomically, loadable
with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from scipy.ndimage import rotate as nd_rotate

from ...log import LOG, progress
from ..april_gan.backend import layer_probs
from ..april_gan.train import (_load_pair, mosaic_from, optimizer_step, prefetched, resize_mask,
                              segmentation_loss, training_samples)
from ..checkpoints import check_finite_loss, save_checkpoint, training_info
from .backend import VcpDims, VcpModel, load_vcp_checkpoint
from .prompts import ABNORMAL_PROMPT, NORMAL_PROMPT, slot_tokens


@dataclass
class TrainConfig:
    """VCP-CLIP training options (config ``backends.<name>.train.<auxiliary dataset>``)."""

    epochs: int = 10  # train.sh
    lr: float = 4e-5  # train.sh: 4e-5 on VisA (the config's mvtec_ad entry sets 2e-5)
    temperature_lr: float = 0.01  # train.py second Adam group (prompt_temp, prompt_temp_l1)
    betas: tuple = (0.5, 0.999)  # train.py Adam
    batch_size: int = 32  # train.sh
    seed: int = 333  # train.sh / train.py setup_seed
    mosaic_p: float = 0.0  # train.sh aug_rate: 0.2 on MVTec (MVTecDataset only), none on VisA
    augment: bool = True  # utils/dataset.py albumentations pipeline (train mode)
    aug_p: float = 0.5  # every albumentations transform's p
    rotate_limit: float = 30.0  # A.Rotate(limit=30)
    class_tokens: int = 2  # train.sh prompt_len: Pre-VCP's r
    prompt_tokens: int = 1  # model_CLIP.py deep_prompt_len
    heads: int = 8  # post_vcp.py Zero_Parameter
    normal_prompt: str = NORMAL_PROMPT
    abnormal_prompt: str = ABNORMAL_PROMPT
    focal_gamma: float = 2.0  # utils/loss.py FocalLoss
    focal_smooth: float = 1e-5
    dice_smooth: float = 1.0  # utils/loss.py BinaryDiceLoss
    autocast: bool = True  # train.py runs the forward under torch.cuda.amp.autocast, no GradScaler (CUDA only)
    max_images: int | None = None  # cap per category (smoke runs); None = the whole test split
    workers: int = 4  # image-decoding threads; the result does not depend on it


# ----------------------------------------------------------------------------- augmentation (own code)
def draw_augmentation(rng: np.random.Generator, c: TrainConfig) -> dict:
    """The random choices of one sample's augmentation, drawn in the main thread (reproducible)."""
    p = c.aug_p
    a = {}
    if rng.random() < p:
        a["rotate"] = float(rng.uniform(-c.rotate_limit, c.rotate_limit))
    if rng.random() < p:
        a["rot90"] = int(rng.integers(4))
    if rng.random() < p:
        a["brightness"], a["contrast"] = float(rng.uniform(-0.2, 0.2)), float(rng.uniform(-0.2, 0.2))
    if rng.random() < p:
        a["noise_var"], a["noise_seed"] = float(rng.uniform(10, 50)), int(rng.integers(2**31))
    if rng.random() < p:
        kind = int(rng.integers(3))
        if kind == 0:
            a["blur"] = 3
        elif kind == 1:
            a["jitter"] = [float(v) for v in rng.uniform(0.8, 1.2, 3)] + [float(rng.uniform(-0.2, 0.2))]
        else:
            a["gauss_k"] = int(rng.choice([3, 5, 7]))
    return a


def augment(img: np.ndarray, mask: np.ndarray, a: dict) -> tuple[np.ndarray, np.ndarray]:
    """Apply :func:`draw_augmentation`'s choices to a uint8 ``[H, W, 3]`` image and its 0/255 mask."""
    img, mask = np.asarray(img), np.asarray(mask)
    if "rotate" in a:  # albumentations Rotate: linear, BORDER_REFLECT_101 (scipy 'mirror'); mask nearest
        img = np.clip(nd_rotate(img.astype(np.float32), a["rotate"], axes=(1, 0), reshape=False, order=1,
                                mode="mirror"), 0, 255).round().astype(np.uint8)
        mask = nd_rotate(mask, a["rotate"], axes=(1, 0), reshape=False, order=0, mode="mirror")
    if a.get("rot90"):
        img, mask = np.rot90(img, a["rot90"]).copy(), np.rot90(mask, a["rot90"]).copy()
    if "brightness" in a:  # RandomBrightnessContrast (brightness by max)
        img = np.clip(img.astype(np.float32) * (1 + a["contrast"]) + a["brightness"] * 255, 0, 255).astype(np.uint8)
    if "noise_var" in a:
        noise = np.random.default_rng(a["noise_seed"]).normal(0, math.sqrt(a["noise_var"]), img.shape)
        img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    pil = None
    if "blur" in a:
        pil = Image.fromarray(img).filter(ImageFilter.BoxBlur(1))
    elif "jitter" in a:
        b, c, s, h = a["jitter"]
        pil = ImageEnhance.Color(ImageEnhance.Contrast(ImageEnhance.Brightness(Image.fromarray(img))
                                                       .enhance(b)).enhance(c)).enhance(s)
        hsv = np.asarray(pil.convert("HSV")).copy()
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(h * 255))) % 256).astype(np.uint8)
        pil = Image.fromarray(hsv, "HSV").convert("RGB")
    elif "gauss_k" in a:  # cv2's sigma for a k x k kernel with sigma 0
        pil = Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.3 * ((a["gauss_k"] - 1) * 0.5 - 1) + 0.8))
    if pil is not None:
        img = np.asarray(pil)
    return img, mask


def mosaic_pick_anomalous(rows_of_class: list[dict], rng: np.random.Generator) -> list[dict]:
    """4 random anomalous rows of one class (``combine_img``: files of the merged ``anomaly`` folder)."""
    bad = [r for r in rows_of_class if r["mask"] is not None]
    if not bad:
        return []
    return [bad[int(rng.integers(len(bad)))] for _ in range(4)]


def _load_sample(rows: list[dict], aug: dict, size: int) -> tuple[np.ndarray, torch.Tensor]:
    im, m = _load_pair(rows[0]) if len(rows) == 1 else mosaic_from(rows)
    img, mask = augment(np.asarray(im), np.asarray(m), aug)
    return img, resize_mask(Image.fromarray(mask), size)


# ----------------------------------------------------------------------------- training
def _new_model(backbone, c: TrainConfig) -> VcpModel:
    dims = VcpDims.of_backbone(backbone, c.class_tokens, c.prompt_tokens)
    return VcpModel(dims, c.heads).to(backbone.device)


def train_vcp(backbone, rows: list[dict], config: TrainConfig, out: str | Path, meta: dict | None = None) -> Path:
    """Train the VCP-CLIP parts on ``rows`` (:func:`.april_gan_train.training_samples`), write the checkpoint."""
    c = config
    if not rows:
        raise ValueError("vcp_clip training: no training images")
    if not 0 <= c.mosaic_p <= 1 or not 0 <= c.aug_p <= 1:
        raise ValueError(f"vcp_clip training: mosaic_p ({c.mosaic_p}) and aug_p ({c.aug_p}) must lie in [0, 1]")
    if c.epochs < 1 or c.batch_size < 1:
        raise ValueError(f"vcp_clip training: epochs ({c.epochs}) and batch_size ({c.batch_size}) must be >= 1")
    device = backbone.device
    classes = sorted({r["category"] for r in rows})
    by_class = {k: [r for r in rows if r["category"] == k] for k in classes}
    tokens = slot_tokens(backbone, [[c.normal_prompt], [c.abnormal_prompt]])
    size, grid = backbone.resolution, backbone.grid
    use_amp = c.autocast and device.type == "cuda"
    losses, start = [], time.time()
    with torch.random.fork_rng(devices=[]):  # init and prompt dropout drawn from the config's seed
        torch.manual_seed(c.seed)
        model = _new_model(backbone, c)
        temps = [model.pre.prompt_temp, model.post.prompt_temp_l1]
        rest = [p for p in model.parameters() if all(p is not t for t in temps)]
        opt = torch.optim.Adam([{"params": rest, "lr": c.lr}, {"params": temps, "lr": c.temperature_lr}],
                               lr=c.lr, betas=tuple(c.betas))
        model.train()
        gen = torch.Generator().manual_seed(c.seed)
        rng = np.random.default_rng(c.seed)
        with ThreadPoolExecutor(max(1, int(c.workers))) as pool:
            for epoch in range(1, c.epochs + 1):
                order = torch.randperm(len(rows), generator=gen).tolist()
                starts = list(range(0, len(order), c.batch_size))
                total, steps = 0.0, 0

                def submit(a):  # rng draws in batch order, in this thread: independent of the worker count
                    batch = [rows[i] for i in order[a : a + c.batch_size]]
                    specs = []
                    for r in batch:
                        pick = (mosaic_pick_anomalous(by_class[r["category"]], rng)
                                if c.mosaic_p > 0 and rng.random() < c.mosaic_p else [])
                        aug = draw_augmentation(rng, c) if c.augment else {}
                        specs.append((pick or [r], aug))
                    return batch, [pool.submit(_load_sample, spec, aug, size) for spec, aug in specs]

                bar = progress(prefetched(starts, submit), total=len(starts),
                               desc=f"vcp_clip epoch {epoch}/{c.epochs}", unit="batch")
                for _batch, loaded in bar:
                    x = backbone.preprocess([im for im, _ in loaded])
                    gt = torch.stack([m for _, m in loaded]).to(device)
                    with torch.no_grad(), torch.autocast("cuda", enabled=use_amp):
                        layers, cls = backbone.forward(x)
                        g = backbone.image_embedding(cls, normalize=False).float()
                        toks = [layers[k].float().reshape(len(loaded), grid[0] * grid[1], -1)
                                for k in backbone.layers]
                    with torch.autocast("cuda", enabled=use_amp):  # train.py: the forward under autocast
                        text = model.text(backbone, tokens, g)
                        raw, new = model.layer_logits(toks, text, grid)
                        all_probs = [layer_probs(lg, size) for lg in raw + new]
                    loss = segmentation_loss(all_probs, gt, c)  # train.py: outside autocast, no grad scaler
                    total, steps = total + optimizer_step(opt, loss, bar), steps + 1
                losses.append(total / max(steps, 1))
                LOG.info("vcp_clip epoch %d/%d: mean loss %.5f (%d batches, %.1f s)", epoch, c.epochs, losses[-1],
                         steps, time.time() - start)
                check_finite_loss("vcp_clip", epoch, losses[-1])
    save_checkpoint(out, model.state_official(), training_info(c, losses, rows, backbone, start, meta, heads=int(c.heads)))
    LOG.info("vcp_clip (%d images of %d classes, %d epochs) -> %s", len(rows), len(classes), c.epochs, out)
    return Path(out)


def train_backend(backbone, root: str | Path, dataset: str, config: TrainConfig, out: str | Path, *,
                  text_cache: str | None = None) -> Path:
    """Trainer interface (:mod:`anorefiner.zsad.registry`); ``text_cache`` is unused (per-image text)."""
    rows = training_samples(root, dataset, config.max_images)
    return train_vcp(backbone, rows, config, out, meta={"auxiliary_dataset": dataset, "auxiliary_root": str(root)})


def check_checkpoint(path: str | Path, backbone=None) -> None:
    """Trainer interface: every key and shape of the official layout, against the backbone when given."""
    load_vcp_checkpoint(path, backbone)
