"""Training of AA-CLIP's adapters on the auxiliary dataset (``Mwxinnn/AA-CLIP@53db195`` ``train.py``,
``dataset/__init__.py``, ``forward_utils.py``; ``scripts.sh``: ``--training_mode full_shot``).

Recipe (the defaults of :class:`TrainConfig`):

* data: the auxiliary dataset's whole *test split with masks* (``dataset/metadata/<dataset>/full-shot.jsonl``
  lists exactly those images: VisA 2162, MVTec AD 1725); VisA-trained adapters score MVTec AD and vice versa;
  images resized bicubically to 518 (squash), masks nearest and ``!= 0`` (``BaseDataset``);
* augmentation (``BaseDataset``, torchvision, drawn per sample): the image stage first applies to the PIL image
  ColorJitter brightness / contrast / saturation 0.5, each with p = 0.7 (the text stage does not); both stages then
  transform the normalised image and its mask together: RandomRotation(30 deg) with p = 0.5, RandomAffine
  translate (0.15, 0.15) with p = 0.5, horizontal and vertical flips with p = 0.5 (nearest, fill 0);
* stage 1, text adapters (``train_text_adapter``): 5 epochs, batch 16, Adam lr 1e-5, betas (0.5, 0.999); per batch
  the class texts ``T`` of the batch's classes with gradients; image features from the frozen surgery tower
  (:func:`.model.text_stage_features`); per level ``softmax(bilinear(100 f T^T))`` and focal + dice (abnormal) +
  dice (normal vs 1 - mask); plus ``0.1 * (mean_b <t_norm, t_abn>)^2``. The official loop *assigns* the loss in
  its level loop, so only the last level (24) enters the gradient: so here;
* stage 2, image adapters (``train_image_adapter``): the class texts of every training class fixed (no grad);
  20 epochs, batch 2, Adam lr 5e-4, betas (0.5, 0.999), MultiStepLR milestones 16000 / 32000 steps, gamma 0.5;
  loss = CE(det @ T^T, label) + sum over the 4 levels of the same segmentation loss;
* seed 111; the checkpoint holds the last epoch of both stages (``test.py`` evaluates every saved image epoch;
  this pipeline uses the last: docs/backends.md).

The checkpoint ``{"text_adapter", "image_adapter", "meta"}`` (official module names) is written atomically and
loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...log import LOG, progress
from ..april_gan.backend import layer_logits, layer_probs
from ..april_gan.train import _load_pair, optimizer_step, prefetched, segmentation_loss, training_samples
from ..checkpoints import check_finite_loss, save_checkpoint, training_info
from .backend import load_adapters
from .model import (SURGERY_AXES, Adapters, adapted_visual, class_text, default_until, dims_of, surgery_start,
                    text_stage_features)


@dataclass
class TrainConfig:
    """AA-CLIP training options (config ``backends.<name>.train.<auxiliary dataset>``)."""

    text_epochs: int = 5  # train.py --text_epoch
    image_epochs: int = 20  # train.py --image_epoch
    text_batch_size: int = 16  # --text_batch_size
    image_batch_size: int = 2  # --image_batch_size
    text_lr: float = 1e-5  # --text_lr
    image_lr: float = 5e-4  # --image_lr
    betas: tuple = (0.5, 0.999)  # both Adam optimisers
    lr_milestones: tuple = (16000, 32000)  # image_scheduler MultiStepLR (per step)
    lr_gamma: float = 0.5
    text_norm_weight: float = 0.1  # --text_norm_weight: the orthogonality term
    text_adapt_weight: float = 0.1  # --text_adapt_weight
    image_adapt_weight: float = 0.1  # --image_adapt_weight
    text_adapt_until: int | None = None  # None: --text_adapt_until 3 on a 12-block text tower (same share elsewhere)
    image_adapt_until: int | None = None  # None: --image_adapt_until 6 on a 24-block tower (same share elsewhere)
    surgery_layer: int | None = None  # None: --surgery_until_layer 20 on 24 blocks (same share elsewhere)
    surgery_axis: str = "batch"  # the official layout quirk (model.py docstring); "tokens": attention over tokens
    relu: bool = False  # --relu is never passed: seg_proj / det_proj without LeakyReLU
    temperature: float = 100.0  # calculate_similarity_map
    real_names: bool = True  # constants.py REAL_NAMES in the prompts
    seed: int = 111  # --seed
    augment: bool = True  # BaseDataset's random transforms
    rotate_degrees: float = 30.0  # RandomRotation(degrees(pi / 6))
    translate: float = 0.15  # RandomAffine(translate=(0.15, 0.15))
    geometric_p: float = 0.5  # RandomApply p of the rotation and the translation, and the flips' p
    jitter: float = 0.5  # ColorJitter brightness / contrast / saturation (image stage only)
    jitter_p: float = 0.7  # RandomApply p of each
    focal_gamma: float = 2.0  # forward_utils.py FocalLoss
    focal_smooth: float = 1e-5
    dice_smooth: float = 1.0  # BinaryDiceLoss
    max_images: int | None = None  # cap per category (smoke runs); None = the whole test split
    workers: int = 4  # image-decoding threads; the result does not depend on it

    @property
    def epochs(self) -> int:
        """All epochs of both stages (what ``anorefiner plan`` prices)."""
        return int(self.text_epochs) + int(self.image_epochs)


# ----------------------------------------------------------------------------- augmentation (torchvision)
def draw_augmentation(rng: np.random.Generator, c: TrainConfig, size: int, colour: bool) -> dict:
    """One sample's random choices (drawn in the main thread, in batch order: reproducible)."""
    a: dict = {}
    if colour:
        for key in ("brightness", "contrast", "saturation"):
            if rng.random() < c.jitter_p:
                a[key] = float(rng.uniform(max(0.0, 1 - c.jitter), 1 + c.jitter))
    if rng.random() < c.geometric_p:
        a["angle"] = float(rng.uniform(-c.rotate_degrees, c.rotate_degrees))
    if rng.random() < c.geometric_p:
        m = c.translate * size
        a["translate"] = [int(round(rng.uniform(-m, m))), int(round(rng.uniform(-m, m)))]
    a["hflip"], a["vflip"] = bool(rng.random() < c.geometric_p), bool(rng.random() < c.geometric_p)
    return a


def colour_jitter(img: np.ndarray, a: dict) -> np.ndarray:
    """ColorJitter's brightness, contrast and saturation factors on the original-size image (in that order)."""
    from ..._compat import import_torchvision

    tf = import_torchvision().transforms.functional
    pil = Image.fromarray(img)
    for key, fn in (("brightness", tf.adjust_brightness), ("contrast", tf.adjust_contrast),
                    ("saturation", tf.adjust_saturation)):
        if key in a:
            pil = fn(pil, a[key])
    return np.asarray(pil)


def geometric(x: torch.Tensor, a: dict) -> torch.Tensor:
    """The joint transform of ``[C, R, R]`` (normalised image channels + mask): rotation, translation, flips;
    nearest neighbour, fill 0 (torchvision ``rotate`` / ``affine`` as RandomRotation / RandomAffine call them)."""
    from ..._compat import import_torchvision

    tv = import_torchvision()
    tf, nearest = tv.transforms.functional, tv.transforms.InterpolationMode.NEAREST
    if "angle" in a:
        x = tf.rotate(x, a["angle"], interpolation=nearest, fill=[0.0] * x.shape[0])
    if "translate" in a:
        x = tf.affine(x, angle=0.0, translate=a["translate"], scale=1.0, shear=[0.0, 0.0], interpolation=nearest,
                      fill=[0.0] * x.shape[0])
    if a.get("hflip"):
        x = x.flip(-1)
    if a.get("vflip"):
        x = x.flip(-2)
    return x


def resize_mask_nearest(mask: Image.Image, size: int) -> torch.Tensor:
    """``Resize((R, R), NEAREST)`` then ``!= 0`` as a float 0/1 tensor ``[R, R]``."""
    return torch.from_numpy((np.asarray(mask.resize((size, size), Image.NEAREST)) != 0).astype(np.float32))


def _load_sample(row: dict, aug: dict, size: int) -> tuple[np.ndarray, torch.Tensor]:
    im, m = _load_pair(row)
    img = colour_jitter(np.asarray(im), aug) if any(k in aug for k in ("brightness", "contrast", "saturation")) \
        else np.asarray(im)
    return img, resize_mask_nearest(m, size)


def _batches(backbone, rows, c: TrainConfig, batch_size: int, colour: bool, gen, rng, pool):
    """Yield ``(rows, images [B,3,R,R], masks [B,R,R])`` of one epoch, augmented, on the backbone's device."""
    size = backbone.resolution
    order = torch.randperm(len(rows), generator=gen).tolist()
    starts = list(range(0, len(order), batch_size))

    def submit(a):
        batch = [rows[i] for i in order[a : a + batch_size]]
        augs = [draw_augmentation(rng, c, size, colour) if c.augment else {} for _ in batch]
        return (batch, augs), [pool.submit(_load_sample, r, g, size) for r, g in zip(batch, augs)]

    for (batch, augs), loaded in prefetched(starts, submit):
        x = backbone.preprocess([im for im, _ in loaded])
        both = [geometric(torch.cat([x[i], m[None]]), g) for i, ((_, m), g) in enumerate(zip(loaded, augs))]
        both = torch.stack(both)
        yield batch, both[:, :3].to(backbone.device), both[:, 3].to(backbone.device)


def seg_loss(feats: list[torch.Tensor], text: torch.Tensor, gt: torch.Tensor, grid, c: TrainConfig) -> torch.Tensor:
    """``calculate_seg_loss`` summed over the given levels: focal + dice(abnormal, mask) + dice(normal, 1 - mask) of
    ``softmax(bilinear(T * f @ text^T))`` at the input size."""
    probs = [layer_probs(layer_logits(f, text, grid, c.temperature), gt.shape[-1]) for f in feats]
    return segmentation_loss(probs, gt, c, normal_dice=True)


def _check(c: TrainConfig) -> None:
    if c.text_epochs < 1 or c.image_epochs < 1 or c.text_batch_size < 1 or c.image_batch_size < 1:
        raise ValueError(f"aa_clip training: text_epochs ({c.text_epochs}), image_epochs ({c.image_epochs}) and the "
                         f"batch sizes ({c.text_batch_size}, {c.image_batch_size}) must be >= 1")
    if c.surgery_axis not in SURGERY_AXES:
        raise ValueError(f"aa_clip training: surgery_axis must be one of {SURGERY_AXES}, got {c.surgery_axis!r}")


def train_aa_clip(backbone, rows: list[dict], config: TrainConfig, out: str | Path, meta: dict | None = None) -> Path:
    """Both stages on ``rows`` (:func:`..april_gan.train.training_samples`); writes the checkpoint to ``out``."""
    c = config
    if not rows:
        raise ValueError("aa_clip training: no training images")
    _check(c)
    n_blocks, n_text = len(backbone.blocks), len(backbone.model.transformer.resblocks)
    image_until = default_until(n_blocks, 6, 24) if c.image_adapt_until is None else int(c.image_adapt_until)
    text_until = default_until(n_text, 3, 12) if c.text_adapt_until is None else int(c.text_adapt_until)
    if not (1 <= image_until <= n_blocks and 0 <= text_until <= n_text):
        raise ValueError(f"aa_clip training: image_adapt_until={image_until} (1..{n_blocks}) and text_adapt_until="
                         f"{text_until} (0..{n_text}) do not fit the backbone")
    start_block = surgery_start(n_blocks, c.surgery_layer)
    levels = [int(v) for v in backbone.layers]
    grid, device = backbone.grid, backbone.device
    classes = sorted({r["category"] for r in rows})
    with torch.random.fork_rng(devices=[]):  # init drawn from the config's seed
        torch.manual_seed(c.seed)
        adapters = Adapters(*dims_of(backbone), len(levels), image_until, text_until, c.relu).to(device)
    gen, rng = torch.Generator().manual_seed(c.seed), np.random.default_rng(c.seed)
    text_losses, image_losses, start = [], [], time.time()
    with ThreadPoolExecutor(max(1, int(c.workers))) as pool:
        opt = torch.optim.Adam(adapters.text_adapter.parameters(), lr=c.text_lr, betas=tuple(c.betas))
        for epoch in range(1, c.text_epochs + 1):
            total, steps = 0.0, 0
            bar = progress(_batches(backbone, rows, c, c.text_batch_size, False, gen, rng, pool),
                           total=-(-len(rows) // c.text_batch_size), desc=f"aa_clip text epoch {epoch}/{c.text_epochs}",
                           unit="batch")
            for batch, x, gt in bar:
                names = [r["category"] for r in batch]
                text = {k: class_text(backbone, adapters, k, c.text_adapt_weight, c.real_names) for k in set(names)}
                t = torch.stack([text[k] for k in names])
                f = text_stage_features(backbone, x, levels[-1], start_block, c.surgery_axis)
                ortho = ((t[:, 0] * t[:, 1]).sum(-1).mean()) ** 2
                loss = seg_loss([f], t, gt, grid, c) + c.text_norm_weight * ortho
                total, steps = total + optimizer_step(opt, loss, bar), steps + 1
            text_losses.append(total / steps)
            LOG.info("aa_clip text epoch %d/%d: mean loss %.5f (%d batches, %.1f s)", epoch, c.text_epochs,
                     text_losses[-1], steps, time.time() - start)
            check_finite_loss("aa_clip text", epoch, text_losses[-1])
        with torch.no_grad():
            text = {k: class_text(backbone, adapters, k, c.text_adapt_weight, c.real_names) for k in classes}
        opt = torch.optim.Adam(adapters.image_adapter.parameters(), lr=c.image_lr, betas=tuple(c.betas))
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(v) for v in c.lr_milestones],
                                                     gamma=c.lr_gamma)
        for epoch in range(1, c.image_epochs + 1):
            total, steps = 0.0, 0
            bar = progress(_batches(backbone, rows, c, c.image_batch_size, True, gen, rng, pool),
                           total=-(-len(rows) // c.image_batch_size),
                           desc=f"aa_clip image epoch {epoch}/{c.image_epochs}", unit="batch")
            for batch, x, gt in bar:
                t = torch.stack([text[r["category"]] for r in batch])
                labels = torch.tensor([r["defect"] != "good" for r in batch], device=device).long()
                seg, det = adapted_visual(backbone, adapters, x, levels, c.image_adapt_weight)
                logits = torch.bmm(det[:, None], t.transpose(1, 2))[:, 0]
                loss = F.cross_entropy(logits, labels) + seg_loss(seg, t, gt, grid, c)
                total, steps = total + optimizer_step(opt, loss, bar), steps + 1
                sched.step()
            image_losses.append(total / steps)
            LOG.info("aa_clip image epoch %d/%d: mean loss %.5f (%d batches, %.1f s)", epoch, c.image_epochs,
                     image_losses[-1], steps, time.time() - start)
            check_finite_loss("aa_clip image", epoch, image_losses[-1])
    state = {part: {k: v.detach().cpu().clone() for k, v in getattr(adapters, part).state_dict().items()}
             for part in ("text_adapter", "image_adapter")}
    info = training_info(c, text_losses + image_losses, rows, backbone, start, meta,
                         epoch_text_losses=text_losses, epoch_image_losses=image_losses, levels=levels,
                         surgery_start=start_block, text_adapt_weight=c.text_adapt_weight,
                         image_adapt_weight=c.image_adapt_weight, real_names=c.real_names)
    save_checkpoint(out, state, info)
    LOG.info("aa_clip adapters (%d images of %d classes, %d + %d epochs) -> %s", len(rows), len(classes),
             c.text_epochs, c.image_epochs, out)
    return Path(out)


def train_backend(backbone, root: str | Path, dataset: str, config: TrainConfig, out: str | Path, *,
                  text_cache: str | None = None) -> Path:
    """Trainer interface (:mod:`anorefiner.zsad.registry`); ``text_cache`` is unused (the text tower is adapted)."""
    rows = training_samples(root, dataset, config.max_images)
    return train_aa_clip(backbone, rows, config, out, meta={"auxiliary_dataset": dataset, "auxiliary_root": str(root)})


def check_checkpoint(path: str | Path, backbone=None) -> None:
    """Trainer interface: both adapter dicts load weights-only with the backbone's widths (keys and shapes)."""
    load_adapters(path, backbone)
