"""Training of APRIL-GAN's linear adapters on the auxiliary dataset (``VAND-APRIL-GAN train.py``).

Recipe (specs/backends.md section 1, "Training recipe"; the defaults of :class:`TrainConfig`):

* data: the *test split with masks* of every category of the auxiliary dataset (VisA-trained
  adapters score MVTec AD and vice versa; ``dataset.py`` defaults to ``mode='test'``); images
  squash-resized like at test time, no other augmentation;
* MVTec as the auxiliary set: with probability ``mosaic_p`` = 0.2 a sample is replaced by a 2x2
  mosaic of 4 random test images of its class (defect type uniform, then file uniform; good
  images with empty masks), pasted at their original size (``dataset.py`` combine_img);
* frozen CLIP under no_grad; per layer: adapters -> L2 norm -> 100 * p @ T (T of the sample's
  class) -> bilinear upsample to the input size (align_corners=True) -> softmax; loss = sum over
  layers of focal (gamma 2, alpha all ones, smooth 1e-5) + binary dice (smooth 1) of the abnormal
  channel (``loss.py``);
* Adam lr 1e-3, betas (0.5, 0.999), batch 8, no weight decay, no scheduler; 3 epochs (MVTec) or
  15 (VisA); seed 111 (``train.py`` setup_seed(111)); masks: binarised, resized bilinearly to the
  input size, ``> 0.5`` (``dataset.py``).

The checkpoint (the official format plus a ``meta`` dict of plain values) is written atomically
and loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...log import LOG, progress
from .backend import CHECKPOINT_KEY, LinearAdapters, layer_logits, layer_probs
from ..checkpoints import check_finite_loss, save_checkpoint, training_info


@dataclass
class TrainConfig:
    """Adapter training options (config ``backends.<name>.train.<auxiliary dataset>``)."""

    epochs: int = 15  # train.sh: 15 on VisA (3 on MVTec: the config's mvtec_ad entry says so)
    mosaic_p: float = 0.0  # train.sh aug_rate: 0.2 on MVTec, none on VisA
    lr: float = 1e-3  # train.py --learning_rate default, not overridden by train.sh
    betas: tuple = (0.5, 0.999)  # train.py Adam
    batch_size: int = 8  # train.sh
    seed: int = 111  # train.py setup_seed(111)
    dim_out: int = 768  # model.py LinearLayer: CLIP's joint embedding width (the text width)
    prompt_set: str = "april_gan"
    temperature: float = 100.0
    focal_gamma: float = 2.0  # loss.py FocalLoss
    focal_smooth: float = 1e-5  # loss.py FocalLoss
    dice_smooth: float = 1.0  # loss.py BinaryDiceLoss
    autocast: bool = True  # train.py runs CLIP under torch.cuda.amp.autocast (CUDA only; CPU stays fp32)
    max_images: int | None = None  # cap per category (smoke runs); None = the whole test split
    workers: int = 4  # image-decoding threads preparing the next batch (decoding VisA's large images
    #                   would otherwise dominate a GPU epoch); the result does not depend on it


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """``loss.py`` FocalLoss on softmaxed ``[B, 2, H, W]`` maps and a binary ``[B, H, W]`` target."""
    one_hot = torch.stack([1 - target, target], dim=1).to(probs.dtype).clamp(smooth, 1.0 - smooth)
    pt = (one_hot * probs).sum(1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``loss.py`` BinaryDiceLoss: 1 - mean over the batch of the per-sample smoothed dice."""
    p, t = prob.reshape(prob.shape[0], -1), target.reshape(target.shape[0], -1).to(prob.dtype)
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return 1 - dice.mean()


def segmentation_loss(prob_maps: list[torch.Tensor], target: torch.Tensor, config,
                      normal_dice: bool = False) -> torch.Tensor:
    """Sum over the maps (layers, branches) of focal + binary dice of the abnormal channel (``loss.py``),
    with ``config``'s ``focal_gamma``, ``focal_smooth`` and ``dice_smooth``: the segmentation loss of
    APRIL-GAN, VCP-CLIP and RareCLIP training. ``normal_dice`` adds the dice of the normal channel against
    the inverted mask (AnomalyCLIP's and AdaCLIP's second dice term)."""
    loss = torch.zeros((), device=target.device)
    for probs in prob_maps:
        probs = probs.float()
        loss = loss + focal_loss(probs, target, config.focal_gamma, config.focal_smooth)
        loss = loss + dice_loss(probs[:, 1], target, config.dice_smooth)
        if normal_dice:
            loss = loss + dice_loss(probs[:, 0], 1 - target, config.dice_smooth)
    return loss


def optimizer_step(opt, loss: torch.Tensor, bar=None) -> float:
    """One step on ``loss`` (zero grad, backward, step); shows it on the progress ``bar``; returns it."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    value = float(loss.detach())
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{value:.4f}")
    return value


def prefetched(keys, submit):
    """Yield ``(payload, loaded)`` per key, where ``submit(key) -> (payload, futures)`` is called one key
    ahead (the next batch decodes in the pool while this one trains) and ``loaded`` holds the futures'
    results in order. ``submit`` runs in the calling thread, in key order, so its random draws do not
    depend on the pool."""
    keys = list(keys)
    nxt = submit(keys[0]) if keys else None
    for j in range(len(keys)):
        payload, futures = nxt
        if j + 1 < len(keys):
            nxt = submit(keys[j + 1])
        yield payload, [f.result() for f in futures]


def training_samples(root: str | Path, dataset: str, max_images: int | None = None) -> list[dict]:
    """Test-split rows (class, image, mask or None) of every category of the auxiliary dataset."""
    from ...data.index import index_category, list_categories

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"auxiliary dataset {dataset!r}: folder {root} does not exist")
    cats = list_categories(root)
    if not cats:
        raise FileNotFoundError(f"auxiliary dataset {dataset!r}: no category folders under {root}")
    rows = []
    for cat in cats:
        df = index_category(root, cat, dataset=dataset, split="test")
        if max_images is not None:
            df = df.head(max_images)
        rows += [{"category": cat, "image": r.image_path, "mask": r.mask_path, "defect": r.defect}
                 for r in df.itertuples()]
    return rows


def _load_pair(row: dict) -> tuple[Image.Image, Image.Image]:
    from ...data.index import load_image, load_mask

    img = load_image(row["image"])
    mask = np.zeros(img.shape[:2], bool) if row["mask"] is None else load_mask(row["mask"], img.shape[:2])
    return Image.fromarray(img), Image.fromarray(mask.astype(np.uint8) * 255)


def mosaic_pick(rows_of_class: list[dict], rng: np.random.Generator) -> list[dict]:
    """The 4 rows of a mosaic: defect type uniform, then file uniform (``dataset.py`` combine_img)."""
    by_defect: dict[str, list[dict]] = {}
    for r in rows_of_class:
        by_defect.setdefault(r["defect"], []).append(r)
    defects = sorted(by_defect)
    picks = []
    for _ in range(4):
        pool = by_defect[defects[int(rng.integers(len(defects)))]]
        picks.append(pool[int(rng.integers(len(pool)))])
    return picks


def mosaic_from(rows: list[dict]) -> tuple[Image.Image, Image.Image]:
    """2x2 mosaic of 4 images and their masks, pasted at the first image's size."""
    pairs = [_load_pair(r) for r in rows]
    w, h = pairs[0][0].size
    img, mask = Image.new("RGB", (2 * w, 2 * h)), Image.new("L", (2 * w, 2 * h))
    for i, (im, m) in enumerate(pairs):
        img.paste(im, ((i % 2) * w, (i // 2) * h))
        mask.paste(m, ((i % 2) * w, (i // 2) * h))
    return img, mask


def mosaic(rows_of_class: list[dict], rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """2x2 mosaic of 4 random test images of one class, original sizes."""
    return mosaic_from(mosaic_pick(rows_of_class, rng))


def _load_sample(rows: list[dict], size: int) -> tuple[np.ndarray, torch.Tensor]:
    im, m = _load_pair(rows[0]) if len(rows) == 1 else mosaic_from(rows)
    return np.asarray(im), resize_mask(m, size)


def resize_mask(mask: Image.Image, size: int) -> torch.Tensor:
    """0/255 mask -> bilinear to ``size`` x ``size`` -> ``> 0.5`` (as a float 0/1 tensor)."""
    m = np.asarray(mask.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy((m > 0.5).astype(np.float32))


def train_adapters(backbone, rows: list[dict], config: TrainConfig, out: str | Path,
                   text_cache: str | None = None, meta: dict | None = None) -> Path:
    """Train the adapters on ``rows`` (:func:`training_samples`) and write the checkpoint to ``out``."""
    from ..prompts import text_embeddings

    c = config
    if not rows:
        raise ValueError("april_gan training: no training images")
    if not 0 <= c.mosaic_p <= 1:
        raise ValueError(f"april_gan training: mosaic_p must lie in [0, 1], got {c.mosaic_p}")
    device = backbone.device
    classes = sorted({r["category"] for r in rows})
    text = {k: text_embeddings(backbone, k, c.prompt_set, text_cache).to(device) for k in classes}
    gen = torch.Generator().manual_seed(c.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c.seed)  # default (kaiming-uniform) init drawn from the config's seed
        adapters = LinearAdapters(backbone.width, c.dim_out, len(backbone.layers)).to(device)
    opt = torch.optim.Adam(adapters.parameters(), lr=c.lr, betas=tuple(c.betas))
    rng = np.random.default_rng(c.seed)
    by_class = {k: [r for r in rows if r["category"] == k] for k in classes}
    size = backbone.resolution
    grid = backbone.grid
    use_amp = c.autocast and device.type == "cuda"
    losses = []
    start = time.time()
    with ThreadPoolExecutor(max(1, int(c.workers))) as pool:
        for epoch in range(1, c.epochs + 1):
            order = torch.randperm(len(rows), generator=gen).tolist()
            total, steps = 0.0, 0
            starts = list(range(0, len(order), c.batch_size))

            def submit(a):  # the rng draws happen here, in batch order: the result does not depend on threads
                batch = [rows[i] for i in order[a : a + c.batch_size]]
                specs = [mosaic_pick(by_class[r["category"]], rng) if c.mosaic_p > 0 and rng.random() < c.mosaic_p
                         else [r] for r in batch]
                return batch, [pool.submit(_load_sample, spec, size) for spec in specs]

            bar = progress(prefetched(starts, submit), total=len(starts), desc=f"april_gan epoch {epoch}/{c.epochs}",
                           unit="batch")
            for batch, loaded in bar:
                imgs, masks = [im for im, _ in loaded], [m for _, m in loaded]
                x = backbone.preprocess(imgs)
                gt = torch.stack(masks).to(device)
                t = torch.stack([text[r["category"]] for r in batch])
                with torch.no_grad(), torch.autocast("cuda", enabled=use_amp):
                    layers, _ = backbone.forward(x)
                toks = [layers[k].float().reshape(len(batch), grid[0] * grid[1], -1) for k in backbone.layers]
                loss = segmentation_loss([layer_probs(layer_logits(p, t, grid, c.temperature), size)
                                          for p in adapters(toks)], gt, c)
                total, steps = total + optimizer_step(opt, loss, bar), steps + 1
            losses.append(total / max(steps, 1))
            LOG.info("april_gan epoch %d/%d: mean loss %.5f (%d batches, %.1f s)", epoch, c.epochs, losses[-1], steps,
                     time.time() - start)
            check_finite_loss("april_gan", epoch, losses[-1])
    state = {k: v.detach().cpu().clone() for k, v in adapters.state_dict().items()}
    save_checkpoint(out, {CHECKPOINT_KEY: state}, training_info(c, losses, rows, backbone, start, meta))
    LOG.info("april_gan adapters (%d images of %d classes, %d epochs) -> %s", len(rows), len(classes), c.epochs, out)
    return Path(out)


def train_backend(backbone, root: str | Path, dataset: str, config: TrainConfig, out: str | Path, *,
                  text_cache: str | None = None) -> Path:
    """Trainer interface (:mod:`anorefiner.zsad.registry`): train the adapters on ``root``'s test split."""
    rows = training_samples(root, dataset, config.max_images)
    return train_adapters(backbone, rows, config, out, text_cache=text_cache,
                          meta={"auxiliary_dataset": dataset, "auxiliary_root": str(root)})


def check_checkpoint(path: str | Path, backbone=None) -> None:
    """Trainer interface: the adapters load weights-only with the backbone's layer count and width."""
    from .backend import load_adapters

    if backbone is None:
        load_adapters(path)
    else:
        load_adapters(path, len(backbone.layers), getattr(backbone, "width", None))
