"""One PGT group's training and inference (AnoRefiner Sec. 3.2, Eq. 4): the losses, the coarse-map scale, and
:class:`Trainer`, which holds the single progressively trained ARD (:func:`anorefiner.refine.pgt.run_pgt` drives it).

The trainer synthesises a group's pseudo-anomalies and scores them with the backend, trains the ARD on them,
recomputes BatchNorm statistics with the final weights (``PGTConfig.bn_recalibrate``) and checks the fit in train
and eval mode, and refines real images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..log import progress
from ..seeding import rng as make_rng
from ..metrics.evaluate import resize_maps
from .combine import combine
from .ard import build_refiner, fuse_layers
from .synthesis import synthesize

if TYPE_CHECKING:
    from .pgt import RefinerOptions

LOSSES = ("dice", "dice_bce", "dice_focal")


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Eq. 4 with the APRIL-GAN convention: per-sample dice of sigmoid(logits) vs mask (smooth=1), 1 − mean."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return 1 - dice.mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean binary focal loss −(1−p_t)^γ·log p_t over pixels (Lin et al. 2017; APRIL-GAN's map loss, 2 classes)."""
    logits, t = logits.float(), target.float()
    log_p = F.logsigmoid(logits)
    log_q = F.logsigmoid(-logits)
    log_pt = t * log_p + (1 - t) * log_q
    return (-(1 - log_pt.exp()) ** gamma * log_pt).mean()


def refiner_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "dice") -> torch.Tensor:
    """``PGTConfig.loss``: Eq. 4 (Dice), optionally plus a per-pixel BCE or focal term."""
    loss = dice_loss(logits, target)
    if kind == "dice_bce":
        loss = loss + F.binary_cross_entropy_with_logits(logits.float(), target.float())
    elif kind == "dice_focal":
        loss = loss + focal_loss(logits, target)
    elif kind != "dice":
        raise ValueError(f"pgt.loss={kind!r}: expected one of {LOSSES}")
    return loss


class CoarseNorm:
    """Online scale of coarse maps (``PGTConfig.coarse_norm``)."""

    def __init__(self, mode: str):
        self.mode, self.lo, self.hi = mode, np.inf, -np.inf

    def update(self, maps: np.ndarray) -> None:
        if self.mode == "first_group" and np.isfinite(self.lo):
            return
        lo, hi = float(np.min(maps)), float(np.max(maps))
        if self.mode in ("group_minmax", "first_group"):
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)

    def __call__(self, maps):
        if self.mode == "none":
            return maps
        return (maps - self.lo) / max(self.hi - self.lo, 1e-12)


def _resize_image(img: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    from PIL import Image

    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}.get(interpolation, Image.BICUBIC)
    if img.shape[:2] == (size, size):
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), resample))


def _load(item) -> np.ndarray:
    if isinstance(item, np.ndarray):
        return item
    from ..data.index import load_image

    return load_image(item)



class Trainer:
    """Holds the single progressively trained ARD and everything one group needs."""

    def __init__(self, feats, coarse, images, backbone, backend, options: RefinerOptions, seed: int, textures,
                 device: torch.device):
        self.feats, self.coarse, self.images = feats, coarse, images
        self.backbone, self.backend, self.options = backbone, backend, options
        self.seed, self.textures, self.device = seed, textures, device
        self.layer_names = list(feats.layers)
        self.resolution = int(backbone.resolution)
        first = next(iter(feats.layers.values()))
        self.grid = tuple(int(s) for s in first.shape[1:3])
        stride = getattr(backbone, "patch_stride", None) or self.resolution / self.grid[0]
        in_channels = int(fuse_layers({k: v[:1] for k, v in feats.layers.items()}, options.ard.feature_fusion).shape[1])
        torch.manual_seed(seed)
        self.model = build_refiner(in_channels, options.ard, grid=self.grid, patch_stride=stride).to(device)
        p = options.pgt
        self.opt = torch.optim.SGD(self.model.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
        self.amp = bool(p.amp and device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.trained = False
        self.loss_history: list[list[float]] = []
        self.last_group: int | None = None  # 1-based group of the last training call: names a diverged ARD

    def real_inputs(self, idx: np.ndarray, norm: CoarseNorm):
        x = fuse_layers({k: np.asarray(v[idx]) for k, v in self.feats.layers.items()}, self.options.ard.feature_fusion)
        c = torch.as_tensor(norm(self.coarse.maps[idx].astype(np.float32)))[:, None]
        return x, c

    @torch.no_grad()
    def refine(self, x: torch.Tensor, c: torch.Tensor, eval_resolution: int) -> np.ndarray:
        """Sigmoid of the ARD logits, resized (bilinear) to the evaluation resolution: [n, E, E]."""
        self.model.eval()
        out = []
        bs = self.options.pgt.batch_size
        for s in range(0, len(x), bs):
            with torch.autocast(self.device.type, enabled=self.amp):
                logits = self.model(x[s:s + bs].to(self.device), c[s:s + bs].to(self.device),
                                    out_size=(self.resolution, self.resolution))
            prob = torch.sigmoid(logits.float())
            prob = F.interpolate(prob, size=(eval_resolution, eval_resolution), mode="bilinear", align_corners=False)
            out.append(prob[:, 0].cpu().numpy())
        maps = np.concatenate(out).astype(np.float32)
        bad = ~np.isfinite(maps)
        if bad.any():  # here, not later, where the calibration's fit would fail on it naming nothing
            p = self.options.pgt
            raise FloatingPointError(
                f"pgt: the ARD trained through group {self.last_group or '?'} gives non-finite values on "
                f"{int(bad.sum())} of {bad.size} pixels: its training diverged (pgt.lr={p.lr}, pgt.loss={p.loss!r}); "
                "lower pgt.lr")
        return maps

    def make_training_set(self, normals: np.ndarray, references: np.ndarray, stream: int) -> dict:
        """The group's training set: pseudo-anomalies of ``normals`` (plus the normals, ``train_on_normals``)."""
        p = self.options.pgt
        data = self.make_pseudo_anomalies(normals, references, p.n_anomalies_per_normal, (stream,))
        return self.add_normals(data) if p.train_on_normals else data

    def make_pseudo_anomalies(self, normals: np.ndarray, references: np.ndarray, per_normal: int,
                              stream: tuple) -> dict:
        """``per_normal`` pseudo-anomalies of each pseudo-normal image: features, raw coarse maps, masks."""
        p, bb = self.options.pgt, self.backbone
        interp = getattr(bb, "interpolation", "bicubic")
        base = [_resize_image(_load(self.images[int(i)]), self.resolution, interp) for i in normals]
        imgs, masks, sources = synthesize(base, per_normal, self.options.synthesis, self.textures, self.seed,
                                          stream=stream)
        layers: dict[str, list] = {k: [] for k in self.layer_names}
        cls_parts = []
        with torch.no_grad():
            for s in range(0, len(imgs), p.feature_batch_size):
                out, cls = bb.forward(bb.preprocess(imgs[s:s + p.feature_batch_size]))
                for k in self.layer_names:
                    if k not in out:
                        raise ValueError(f"backbone {bb.name!r} did not return layer {k!r} of the feature cache "
                                         f"(returned {list(out)})")
                    layers[k].append(out[k].float().cpu())
                if cls is not None:
                    cls_parts.append(cls.float().cpu())
        qlayers = {k: torch.cat(v) for k, v in layers.items()}
        qcls = torch.cat(cls_parts) if cls_parts else None
        exclude = [int(normals[s]) for s in sources]
        qmaps = self.backend.score_queries(qlayers, qcls, self.feats, [int(i) for i in references], exclude)
        qmaps = torch.as_tensor(qmaps).float().cpu().numpy()
        x = fuse_layers({k: v.numpy() for k, v in qlayers.items()}, self.options.ard.feature_fusion)
        return {"x": x, "coarse": qmaps, "masks": torch.as_tensor(masks[:, None].astype(np.float32)),
                "normals": normals, "first_image": imgs[0]}

    def add_normals(self, data: dict) -> dict:
        """Append the pseudo-normal images (cached features, their coarse maps, empty masks)."""
        normals = data["normals"]
        x, _ = self.real_inputs(normals, CoarseNorm("none"))
        empty = torch.zeros((len(normals),) + tuple(data["masks"].shape[1:]))
        return {**data, "x": torch.cat([data["x"], x]), "coarse": np.concatenate([data["coarse"], self.coarse.maps[normals]]),
                "masks": torch.cat([data["masks"], empty])}

    def train(self, data: dict, norm: CoarseNorm, stream: int) -> list[float]:
        p = self.options.pgt
        x, masks = data["x"], data["masks"]
        c = torch.as_tensor(norm(data["coarse"]))[:, None].float()
        gen = make_rng(self.seed, "pgt_order", stream)
        self.model.train()
        history = []
        epochs = p.first_group_epochs if stream == 0 and p.first_group_epochs is not None else p.epochs
        bar = progress(range(epochs), desc=f"pgt group {stream + 1} epochs", unit="epoch", leave=False)
        for _ in bar:
            order = gen.permutation(len(x))
            total = 0.0
            for s in range(0, len(order), p.batch_size):
                b = torch.as_tensor(order[s:s + p.batch_size])
                with torch.autocast(self.device.type, enabled=self.amp):
                    logits = self.model(x[b].to(self.device), c[b].to(self.device),
                                        out_size=(self.resolution, self.resolution))
                loss = refiner_loss(logits, masks[b].to(self.device), p.loss)
                self.opt.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
                total += float(loss.detach()) * len(b)
            history.append(total / len(x))
            bar.set_postfix(loss=f"{history[-1]:.4f}")
        self.trained = self.trained or epochs > 0
        self.last_group = stream + 1
        self.loss_history.append(history)
        return history

    def coarse_at(self, patch_maps: np.ndarray, size: int, norm: CoarseNorm) -> np.ndarray:
        """Patch-level coarse maps upsampled to ``size`` as the coarse half of ``combined`` is
        (``PGTConfig.coarse_align_corners``), then normalised."""
        return norm(resize_maps(patch_maps, (size, size), self.options.pgt.coarse_align_corners))

    def diagnostic(self, data: dict, norm: CoarseNorm) -> dict:
        """The first pseudo-anomaly of ``data`` with its coarse, ARD and combined maps (input resolution; combined by
        ``PGTConfig.combine`` without calibration, which is fitted on a whole group of real images)."""
        c = norm(data["coarse"][:1])
        ard = self.refine(data["x"][:1], torch.as_tensor(c)[:, None].float(), self.resolution)[0]
        coarse = self.coarse_at(data["coarse"][:1], self.resolution, norm)[0]
        return {"image": data["first_image"], "mask": data["masks"][0, 0].numpy() > 0.5,
                "coarse": coarse.astype(np.float16), "ard": ard.astype(np.float16),
                "combined": combine(coarse, ard, self.options.pgt.combine).astype(np.float16)}

    def check_fit(self, data: dict, norm: CoarseNorm) -> dict:
        """After training: the final weights' loss on the training set in train and eval mode, with BN
        recalibrated first (``PGTConfig.bn_recalibrate``); the eval-mode loss is what inference gets."""
        fit = {"train_mode": self.loss_on(data, norm, train_mode=True)}
        if self.options.pgt.bn_recalibrate and self._norm_layers():
            fit["eval_mode_stale_bn"] = self.loss_on(data, norm, train_mode=False)
            self.recalibrate_bn(data, norm)
        fit["eval_mode"] = self.loss_on(data, norm, train_mode=False)
        # how strong the pseudo-anomalies are in the coarse map (issue 26: much stronger than real defects)
        coarse = self.coarse_at(data["coarse"], self.resolution, norm)
        inside = data["masks"][:, 0].numpy() > 0.5
        fit["pseudo_coarse_median_in_mask"] = float(np.median(coarse[inside])) if inside.any() else float("nan")
        fit["pseudo_coarse_median_outside"] = float(np.median(coarse[~inside]))
        return fit

    def _norm_layers(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @torch.no_grad()
    def _forward_all(self, data: dict, norm: CoarseNorm, *, train_mode: bool, bn_momentum: float | None = 0.0):
        """Logits of every training image, in training-batch-sized chunks. In train mode BN normalises with
        batch statistics and updates its buffers with ``bn_momentum`` (0: left unchanged; None: cumulative)."""
        bs = self.options.pgt.batch_size
        c = torch.as_tensor(norm(data["coarse"]))[:, None].float()
        bns = self._norm_layers()
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.momentum = bn_momentum
        self.model.train(train_mode)
        try:
            for s in range(0, len(data["x"]), bs):
                with torch.autocast(self.device.type, enabled=self.amp):
                    yield s, self.model(data["x"][s:s + bs].to(self.device), c[s:s + bs].to(self.device),
                                        out_size=(self.resolution, self.resolution))
        finally:
            for m, mom in zip(bns, momenta):
                m.momentum = mom
            self.model.eval()

    def loss_on(self, data: dict, norm: CoarseNorm, *, train_mode: bool) -> float:
        """Mean loss over ``data`` with the current weights; BN on batch (train mode) or running statistics."""
        total = 0.0
        for s, logits in self._forward_all(data, norm, train_mode=train_mode):
            total += float(refiner_loss(logits, data["masks"][s:s + len(logits)].to(self.device),
                                        self.options.pgt.loss)) * len(logits)
        return total / len(data["x"])

    def recalibrate_bn(self, data: dict, norm: CoarseNorm) -> None:
        """``PGTConfig.bn_recalibrate``: BN running statistics become the average of the training batches'
        statistics under the final weights, so eval mode computes what training fit."""
        for m in self._norm_layers():
            m.reset_running_stats()
        for _ in self._forward_all(data, norm, train_mode=True, bn_momentum=None):
            pass
