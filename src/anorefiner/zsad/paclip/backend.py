"""PA-CLIP: pseudo-anomaly-aware CLIP for zero-shot anomaly detection (papers/pa-clip.txt).

Pipeline (section numbers of the paper):

* 3.2 multi-scale aggregation (Eq. 1): per layer and r in {1,3,5}, the r x r mean of the token
  grid (zero padding counted), after the per-image LayerNorm that MuSc's LNAMD uses (option
  ``layer_norm``), L2-normalised so dot products are cosines. Normal images: the top
  ``normal_ratio`` (10%) of the test images by CLS-text similarity (Eq. 3, temperature ``tau_text``),
  prompts "a photo of normal/defective {category}" (``normal_selection="text"``). Backbones without
  a text tower (CNNs) use ``"visual"``: the images whose mean patch kNN distance to the other images
  is lowest (chosen automatically, with a warning).
* 3.3 PAM: content-adaptive augmentation (CADA, Eq. 4) of the normal images -> normal memory bank;
  all test images -> full memory bank; both reduced by seeded approximate greedy coreset sampling.
* 3.4 PAD (Eq. 5-8): per bank, per query patch the min cosine distance to each reference image's
  bank entries, then the mean of the ranks ``[k_min, k_max)`` of those minima (k bounded by
  fractions ``topmin_min``/``topmin_max`` of the number of references, "adaptive interval
  averaging"); ``S_final = S_c - alpha * S_b * 1[S_b <= tau]`` with ``tau`` the ``tau_quantile``
  quantile of all S_b values of the scored set; multi-scale fusion ``S = sum_r w_r S_r``.

CADA position measure (Eq. 4 leaves it open): the object position of an image is the centroid
(in [0,1] grid coordinates) of a foreground saliency mask; saliency of a patch = cosine distance of
its first-layer (LN'd) token to the mean token of the grid border, mask = saliency above the image's
mean saliency. ``sigma_spatial`` = RMS distance of the centroids from their mean over the images;
``sigma_temporal`` = RMS of successive centroid differences in index order / sqrt(2) (frame-to-frame
variation of the production line). ``sigma > sigma_threshold`` -> photometric augments only
(brightness, contrast, noise), else geometric ones (flips, 90-degree rotations) too.
With an image source and a backbone, augments are applied to images and re-extracted; without
them (cached features only) only the geometric augments are possible (on the token grid) and the
photometric case falls back to the un-augmented tokens (logged).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...log import LOG, progress
from .coreset import greedy_coreset
from ..maps import resolve_device as _resolve_device
from ..musc.backend import DEFAULT_CHUNK


@dataclass
class PACLIPConfig:
    """Options of the ``paclip`` backend (config ``backends.paclip.options``)."""

    r_list: tuple = (1, 3, 5)  # paper Eq. 1
    r_weights: tuple | None = None  # Eq. 8 w_r; paper gives none -> equal weights (as MuSc averages r)
    layers: tuple | None = None  # None: every cached layer (ViT-L-14-336 5/11/17/23 0-indexed)
    layer_norm: bool = True  # Eq. 1 omits it; per-image LN as MuSc's LNAMD keeps layers on one scale
    category: str = ""  # "{category}" of the prompts; the coarse command passes --category
    prompt_normal: str = "a photo of normal {category}"  # paper Sec. 3.2
    prompt_defect: str = "a photo of defective {category}"  # paper Sec. 3.2
    tau_text: float = 0.01  # Eq. 2-3 temperature: CLIP's own logit scale 100 (paper gives no value)
    normal_ratio: float = 0.1  # paper: "top 10%"
    min_normal_images: int = 2  # a normal image is scored against the *other* normal images
    normal_selection: str = "auto"  # "text" | "visual" | "auto" (= text when the backbone has one)
    n_augment: int = 4  # augmented views per normal image (paper: unspecified; 4 flips/rotations)
    sigma_threshold: float = 0.05  # CADA: position spread (fraction of the side) above which only
    #                                photometric augments are used; aligned MVTec objects stay < 0.03
    coreset_ratio_normal: float = 0.25  # small bank (10% of images x views): keep more of it
    coreset_ratio_full: float = 0.1  # PatchCore's usual ratio for a full-size bank
    coreset_proj_dim: int = 128  # PatchCore's approximate-greedy projection size
    topmin_min: float = 0.0  # k_min fraction (MuSc's interval averaging, which PA-CLIP cites)
    topmin_max: float = 0.3  # k_max fraction (MuSc's value)
    alpha: float = 0.5  # Eq. 7 differential coefficient in [0, 1]: the middle of the range
    tau_quantile: float = 0.9  # Eq. 7 tau = this quantile of S_b: protects the top 10% responses,
    #                             more than the anomalous area fraction of MVTec/VisA (~3%)
    image_score: str = "mean"  # paper: "averaging the patch-level scores"; "max" also offered
    # Ablation switches (paper Sec. 4.3, Tables 3-4: baseline, +PAD, +PAD+PAM, +PAD+MPAM; the paper
    # does not say what the banks are without PAM, so the reading below is this project's):
    pad: bool = True  # Sec. 3.4 PAD (Eq. 7): False = S_c of the full bank only, no normal bank
    pam: bool = True  # Sec. 3.3 PAM: CADA-augmented normal bank; False = the selected normal images as they are
    mpam: bool = True  # Sec. 3.3 "Multi-Scale PAM": False = one aggregation level, r_list[0] (r = 1)
    chunk: int = DEFAULT_CHUNK  # elements per distance block: bounds memory
    device: str = "auto"


def aggregate(x, r: int, layer_norm: bool = True) -> torch.Tensor:
    """Eq. 1: ``[N, h, w, C]`` -> L2-normalised ``[N, h, w, C]`` r x r means."""
    y = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).float().permute(0, 3, 1, 2)
    if layer_norm:
        y = F.layer_norm(y, y.shape[1:], eps=1e-5)
    if r > 1:
        y = F.avg_pool2d(y, r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
    y = y.permute(0, 2, 3, 1)
    return y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def object_positions(tokens, layer_norm: bool = True) -> np.ndarray:
    """Centroids ``[N, 2]`` (y, x in [0, 1]) of each image's foreground saliency mask (module doc)."""
    z = aggregate(tokens, 1, layer_norm)  # [N, h, w, C]
    n, h, w, _ = z.shape
    border = torch.ones(h, w, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    bg = z[:, border].mean(1)
    bg = bg / bg.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sal = 1 - torch.einsum("nhwc,nc->nhw", z, bg)
    mask = (sal > sal.mean(dim=(1, 2), keepdim=True)).float()
    mask = torch.where(mask.sum((1, 2), keepdim=True) > 0, mask, torch.ones_like(mask))
    ys = (torch.arange(h).float() + 0.5) / h
    xs = (torch.arange(w).float() + 0.5) / w
    area = mask.sum((1, 2))
    cy = (mask * ys[None, :, None]).sum((1, 2)) / area
    cx = (mask * xs[None, None, :]).sum((1, 2)) / area
    return torch.stack([cy, cx], 1).numpy()


def cada_sigma(positions: np.ndarray) -> tuple[float, float, float]:
    """Eq. 4: ``(sigma, sigma_spatial, sigma_temporal)`` of the centroids ``[N, 2]`` in index order."""
    p = np.asarray(positions, dtype=np.float64)
    s_spatial = float(np.sqrt(((p - p.mean(0)) ** 2).sum(1).mean())) if len(p) else 0.0
    s_temporal = float(np.sqrt((np.diff(p, axis=0) ** 2).sum(1).mean() / 2)) if len(p) > 1 else 0.0
    return float(np.hypot(s_spatial, s_temporal)), s_spatial, s_temporal


def _geometric(x: torch.Tensor, v: int) -> torch.Tensor:
    """View ``v`` of a ``[..., h, w, C]`` grid or ``[..., H, W, 3]`` image: hflip, vflip, rot90, rot270."""
    ops = [lambda t: t.flip(-2), lambda t: t.flip(-3),
           lambda t: t.rot90(1, (-3, -2)), lambda t: t.rot90(3, (-3, -2))]
    if x.shape[-3] != x.shape[-2]:
        ops = ops[:2]
    return ops[v % len(ops)](x)


def _photometric(img: np.ndarray, gen: np.random.Generator) -> np.ndarray:
    """Conservative appearance change: brightness +-10%, contrast +-10%, Gaussian noise sigma 2/255."""
    x = img.astype(np.float32)
    mean = x.mean()
    x = (x - mean) * gen.uniform(0.9, 1.1) + mean * gen.uniform(0.9, 1.1)
    x = x + gen.normal(0, 2.0, size=x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


class _Bank:
    """Memory bank of one (r, layer): normalised entries with their reference id and image index."""

    def __init__(self, entries, ref, image):
        self.entries, self.ref, self.image = entries, ref, image
        self.n_ref = int(ref.max()) + 1 if ref.numel() else 0


class PACLIPBackend:
    """PA-CLIP as a :class:`~anorefiner.zsad.Backend`.

    ``images``: optional callable ``indices -> list of uint8 [H,W,3]`` for image-level CADA
    (needs ``backbone``); without it CADA works on the token grid.
    """

    def __init__(self, config: PACLIPConfig | None = None, backbone=None, name="paclip", seed=0, images=None):
        self.config = config or PACLIPConfig()
        self.backbone, self.name, self.seed, self.images = backbone, name, int(seed), images
        self.device = _resolve_device(self.config.device)
        c = self.config
        if c.normal_selection not in ("text", "visual", "auto"):
            raise ValueError(f"paclip option normal_selection must be text|visual|auto, got {c.normal_selection!r}")
        if c.image_score not in ("mean", "max"):
            raise ValueError(f"paclip option image_score must be 'mean' or 'max', got {c.image_score!r}")
        if not 0 <= c.alpha <= 1:
            raise ValueError(f"paclip option alpha must lie in [0, 1], got {c.alpha}")
        self.last_info: dict = {}

    # ---- 3.2: normal image selection -------------------------------------------------------
    def _text(self):
        """``[2, D]`` normal/defective prompt embeddings, or None when the backbone has no text tower."""
        if self.backbone is None:
            return None
        c = self.config
        prompts = [c.prompt_normal.format(category=c.category), c.prompt_defect.format(category=c.category)]
        try:
            return torch.as_tensor(self.backbone.encode_text(prompts)).float().cpu()
        except (TypeError, NotImplementedError, AttributeError):
            return None

    def selection_mode(self, feats) -> str:
        c = self.config
        has_text = feats.cls is not None and self._text() is not None
        if c.normal_selection == "text" and not has_text:
            raise ValueError("paclip normal_selection='text' needs a backbone with encode_text and a CLS token")
        if c.normal_selection != "auto":
            return c.normal_selection
        if has_text:
            return "text"
        LOG.warning("PA-CLIP: no CLIP text tower for this backbone -> VISUAL normal-image selection "
                    "(lowest mean patch kNN distance), not the paper's text prompts (Eq. 2-3)")
        return "visual"

    def normal_scores(self, feats, idx: np.ndarray) -> np.ndarray:
        """Higher = more normal, for images ``idx``."""
        c = self.config
        mode = self.selection_mode(feats)
        if mode == "text":
            text = self._text()
            with torch.no_grad():
                img = torch.as_tensor(self.backbone.image_embedding(torch.as_tensor(np.asarray(feats.cls)[idx]))).float().cpu()
            text = text / text.norm(dim=-1, keepdim=True)
            img = img / img.norm(dim=-1, keepdim=True)
            logits = img @ text.T / c.tau_text  # Eq. 3 for both prompts
            return torch.softmax(logits, 1)[:, 0].numpy()
        from ..musc.backend import msm

        total = np.zeros(len(idx))
        for name in self._names(feats):
            z = aggregate(np.asarray(feats.layers[name])[idx], 1, c.layer_norm).to(self.device)
            total += msm(z.reshape(len(idx), -1, z.shape[-1]), c.topmin_max, c.chunk).mean(1).cpu().numpy()
        return -total

    # ---- 3.3: memory banks -----------------------------------------------------------------
    def _names(self, feats) -> list[str]:
        names = list(self.config.layers) if self.config.layers else list(feats.layers)
        missing = [n for n in names if n not in feats.layers]
        if missing:
            raise ValueError(f"paclip: layers {missing} not in the feature cache (has {list(feats.layers)})")
        return names

    def _augmented_tokens(self, feats, normal: np.ndarray, sigma: float) -> tuple[dict, np.ndarray]:
        """Tokens (layer -> [V, h, w, C]) of the normal images and their augmented views, and the
        index of the source image of each view."""
        c = self.config
        names = self._names(feats)
        photometric = sigma > c.sigma_threshold
        views = {k: [torch.as_tensor(np.asarray(feats.layers[k])[normal]).float()] for k in names}
        source = [normal]
        if not c.pam:  # ablation: no content-adaptive augmentation (Sec. 3.3)
            return {k: v[0] for k, v in views.items()}, normal
        gen = np.random.default_rng([self.seed, 4])
        image_source = self._view_source()
        if image_source is not None:
            imgs = image_source(list(normal))
            for v in range(c.n_augment):
                aug = [_photometric(im, gen) if photometric else
                       np.ascontiguousarray(_geometric(torch.from_numpy(np.array(im)), v).numpy()) for im in imgs]
                layers = self._encode_views(aug)
                for k in names:
                    views[k].append(torch.as_tensor(layers[k]).float().cpu())
                source.append(normal)
        elif not photometric:
            for v in range(c.n_augment):
                for k in names:
                    views[k].append(_geometric(views[k][0], v))
                source.append(normal)
        else:
            LOG.warning("PA-CLIP CADA: sigma=%.3f asks for photometric augments, which need images; "
                        "the normal bank uses the un-augmented tokens", sigma)
        return {k: torch.cat(v, 0) for k, v in views.items()}, np.concatenate(source)

    def _view_source(self):
        """``indices -> images`` for image-level CADA, or None (it needs the images and a backbone to encode)."""
        return self.images if self.backbone is not None else None

    def _encode_views(self, images: list) -> dict:
        """Tokens ``{layer: [V, h, w, C]}`` of augmented images: the backbone's forward."""
        with torch.no_grad():
            layers, _ = self.backbone.forward(self.backbone.preprocess(images))
        return layers

    def _bank(self, z: torch.Tensor, image: np.ndarray, ratio: float, seed: int) -> _Bank:
        """``z`` [V, h, w, C] normalised; reference id = view number, ``image`` = source per view."""
        v, h, w, ch = z.shape
        flat = z.reshape(-1, ch)
        ref = torch.arange(v).repeat_interleave(h * w)
        img = torch.as_tensor(image, dtype=torch.long).repeat_interleave(h * w)
        keep = greedy_coreset(flat.to(self.device), ratio, seed, self.config.coreset_proj_dim).cpu()
        return _Bank(flat[keep].to(self.device), ref[keep].to(self.device), img[keep].to(self.device))

    # ---- 3.4: PAD --------------------------------------------------------------------------
    def psi(self, q: torch.Tensor, q_image: int, bank: _Bank) -> torch.Tensor:
        """Eq. 6 for one query image ``q`` [L, C]: interval mean of per-reference min cosine distances,
        the query's own image excluded (zero-shot mutual scoring: it is in the full bank)."""
        c = self.config
        L = q.shape[0]
        mins = torch.full((L, bank.n_ref), float("inf"), device=q.device)
        step = max(1, c.chunk // max(L, 1))
        for s in range(0, bank.entries.shape[0], step):
            d = 1 - q @ bank.entries[s : s + step].T
            idx = bank.ref[s : s + step].expand(L, -1)
            mins.scatter_reduce_(1, idx, d, reduce="amin")
        own = torch.zeros(bank.n_ref, dtype=torch.bool, device=q.device)
        own[bank.ref[bank.image == q_image]] = True
        valid = torch.isfinite(mins[0]) & ~own
        n = int(valid.sum())
        if n == 0:
            raise ValueError(f"paclip: no reference image left for query image #{q_image}")
        k_max = max(1, int(n * c.topmin_max))
        k_min = min(int(n * c.topmin_min), k_max - 1)
        vals = torch.topk(mins[:, valid], k_max, dim=1, largest=False, sorted=True).values
        return vals[:, k_min:].mean(1)

    def _score(self, query_layers: dict, query_image: list, ref_feats, ref_idx: np.ndarray,
               report: bool = False) -> np.ndarray:
        """``report``: a progress bar over (r, layer) and a log line per scale (the coarse maps of a category;
        PGT's many small pseudo-anomaly batches stay quiet)."""
        c = self.config
        start = time.perf_counter()
        names = self._names(ref_feats)
        m = len(query_image)
        h, w = next(iter(query_layers.values())).shape[1:3]
        if len(ref_idx) < 2:
            raise ValueError(f"paclip: needs at least 2 reference images, got {len(ref_idx)}")
        n_normal = min(len(ref_idx), max(c.min_normal_images, int(round(c.normal_ratio * len(ref_idx)))))
        normal = ref_idx[np.argsort(-self.normal_scores(ref_feats, ref_idx), kind="stable")[:n_normal]]
        sigma, s_sp, s_tm = cada_sigma(object_positions(np.asarray(ref_feats.layers[names[0]])[ref_idx], c.layer_norm))
        aug, aug_source = self._augmented_tokens(ref_feats, normal, sigma)
        self.last_info = {"normal_images": normal.tolist(), "sigma": sigma, "sigma_spatial": s_sp,
                          "sigma_temporal": s_tm, "n_views": int(len(aug_source))}
        if report:
            LOG.info("%s: %d normal images selected, CADA sigma %.3f, %d views in the normal bank (%.1f s)",
                     self.name, len(normal), sigma, len(aug_source), time.perf_counter() - start)
        weights = c.r_weights or tuple(1.0 / len(c.r_list) for _ in c.r_list)
        if len(weights) != len(c.r_list):
            raise ValueError(f"paclip: r_weights {weights} does not match r_list {c.r_list}")
        r_list = tuple(c.r_list) if c.mpam else tuple(c.r_list[:1])
        if not c.mpam:
            weights = (1.0,)
        self.last_info.update(pad=c.pad, pam=c.pam, mpam=c.mpam, r_list=list(r_list))
        bar = progress(total=len(r_list) * len(names), desc=f"{self.name} scales x layers") if report else None
        total = np.zeros((m, h * w))
        for ri, r in enumerate(r_list):
            s_c = torch.zeros((m, h * w), device=self.device)
            s_b = torch.zeros_like(s_c)
            for li, name in enumerate(names):
                seed = self.seed * 1000 + ri * 10 + li
                full = self._bank(aggregate(np.asarray(ref_feats.layers[name])[ref_idx], r, c.layer_norm),
                                  ref_idx, c.coreset_ratio_full, seed)
                normal_bank = (self._bank(aggregate(aug[name], r, c.layer_norm), aug_source,
                                          c.coreset_ratio_normal, seed + 5) if c.pad else None)
                q = aggregate(query_layers[name], r, c.layer_norm).reshape(m, h * w, -1).to(self.device)
                for i in range(m):
                    s_c[i] += self.psi(q[i], query_image[i], full) / len(names)
                    if normal_bank is not None:
                        s_b[i] += self.psi(q[i], query_image[i], normal_bank) / len(names)
                if bar is not None:
                    bar.update(1)
            # Eq. 7; the "no PAD" ablation keeps the full-bank response alone (Eq. 5)
            tau = torch.quantile(s_b.flatten().double(), c.tau_quantile).float()
            s_final = s_c - c.alpha * s_b * (s_b <= tau).float() if c.pad else s_c
            total += weights[ri] * s_final.cpu().numpy()  # Eq. 8
            if report:
                LOG.info("%s: scale r=%d (%d/%d) scored for %d images, %.1f s elapsed", self.name, r, ri + 1,
                         len(r_list), m, time.perf_counter() - start)
        if bar is not None:
            bar.close()
        return total.reshape(m, h, w).astype(np.float32)

    def coarse(self, feats):
        from .. import CoarseResult

        n = len(feats.ids)
        idx = np.arange(n)
        layers = {k: np.asarray(feats.layers[k]) for k in self._names(feats)}
        maps = self._score(layers, list(idx), feats, idx, report=True)
        flat = maps.reshape(n, -1)
        scores = flat.mean(1) if self.config.image_score == "mean" else flat.max(1)
        return CoarseResult(maps=maps, scores=scores.astype(np.float32))

    def reference_indices(self, n: int, sources) -> np.ndarray:
        """:meth:`coarse` builds its banks from every test image."""
        return np.arange(n)

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude):
        """Banks are rebuilt from the references; ``tau`` is taken from the queries' S_b."""
        ex = [-1 if e is None else int(e) for e in exclude]
        maps = self._score(query_layers, ex, feats, np.asarray(reference_idx, dtype=np.int64))
        return torch.as_tensor(maps)
