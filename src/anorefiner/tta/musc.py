"""MuSc as a test-time-adaptation backend: differentiable mutual scoring of a group's images.

MuSc has no classifier, so the TTA losses need a 2-class distribution per patch. This module
implements the mapping of ``shared/specs/tta.md`` A.5 P2(b) (a PROPOSAL, adopted):

* **Score** ``s`` of a patch (per layer, aggregation degree ``r`` = 1): MuSc's MSM
  (:mod:`anorefiner.zsad.musc.backend`): LNAMD of the tokens, min Euclidean distance to each other image of
  the group, mean of the ``effective_k(G - 1, topmin)`` smallest.
* **Calibration** per group and layer (detached): ``tau = median + k * 1.4826 * MAD`` and
  ``T = 1.4826 * MAD`` of all patch scores of the group at the weights the group starts with;
  ``p_abn = sigmoid((s - tau) / T)``, written as the 2-class logits ``(0, (s - tau) / T)``. Most
  patches are then confidently normal, and entropy minimisation pushes scores away from ``tau``.
* **Image unit** (DeYO's PLPD only; MuSc's image score is not a classifier output, so
  ``image_loss`` is False): ``m = max_patch mean_layers (s - tau) / T``, calibrated again over the
  group's images (``image_calibration: image``): logits ``(0, (m - tau_img) / T_img)`` with
  ``tau_img = median(m) + k 1.4826 MAD(m)``, ``T_img = 1.4826 MAD(m)``. A.5 suggests the patch
  calibration itself (``image_calibration: patch``: logits ``(0, m)``), but the maximum of 1,369
  patches nearly always exceeds the patches' 3-sigma point, so almost every image is "abnormal"
  (measured: 28 of 28 images of a MVTec bottle group, random ViT-B-16 at 224 px; 0 of 28 with the
  image calibration), and a shuffled copy, whose seams look anomalous, is at least as abnormal:
  DeYO's PLPD ``p(abn | x) - p(abn | x')`` would then be <= 0 for nearly every image.
* **Gradient**: the reference tokens (all images of the group) are computed without gradient at
  the current weights (:meth:`MuscTTA.begin_group`); the images of a micro-batch are forwarded with
  gradient and scored against them, leaving themselves out (a perturbed or shuffled copy replaces
  its image, A.5 P4). The min and the k-smallest selection are found without gradient and the
  distances to the selected patches recomputed with it: the same (sub)gradient as differentiating
  the min/sort, with memory ``B * L * k * C`` instead of ``B * L * G * L``.
* **Prediction**: the full MuSc maps of the group (``r_list``, all layers) and RsCIN
  (:mod:`anorefiner.zsad.musc.rscin`) on ``ln_post(cls) @ proj``, exactly as the MuSc* backend.

``ln_post`` only feeds RsCIN's embeddings, so no loss reaches it (tta.md A.5 P1: frozen for MuSc).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from ..zsad.musc.backend import MuscConfig, effective_k, lnamd, msm, score
from ..zsad.musc.rscin import rscin
from .common import Units

MAD_TO_SIGMA = 1.4826  # MAD of a Gaussian x 1.4826 = its standard deviation


@dataclass
class MuscTTAConfig:
    """Options of the MuSc mapping (tta.md A.5 P2(b); every value is open in the paper)."""

    calib_k: float = 3.0  # tau = median + 3 robust sigmas: a patch is "abnormal" beyond 3 sigma
    query_fraction: float = 1.0  # patches of each image that carry gradient; 1.0 is affordable with
    # the selected-distance gradient above (A.5 suggested 0.2 for a full distance matrix)
    forward_batch: int = 8  # images per no-grad forward of a group (memory only)
    min_scale: float = 1e-6  # floor of T when half the patches score alike (MAD = 0)
    image_calibration: str = "image"  # "image": the image unit is standardised over the group's images;
    # "patch": A.5's reading (the patch calibration only); see the module docstring


def vit_forward(backbone, x: torch.Tensor, layer_ids, need_cls: bool = False):
    """``ClipViT.forward`` without its ``no_grad``: tokens ``{layer: [B,h,w,C]}`` of the 1-indexed
    blocks ``layer_ids`` and, if ``need_cls``, the last block's class token (else None). Stops
    after the last block it needs."""
    v = backbone.visual
    x = v.conv1(x.to(backbone.device, dtype=v.conv1.weight.dtype))
    n, c, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    cls = v.class_embedding.to(x.dtype).reshape(1, 1, c).expand(n, 1, c)
    x = torch.cat([cls, x], dim=1) + backbone.pos_embed.to(x.device, x.dtype)
    x = v.patch_dropout(x)
    x = v.ln_pre(x)
    bf = backbone.batch_first
    if not bf:
        x = x.transpose(0, 1)
    wanted = {int(i) for i in layer_ids}
    last = len(backbone.blocks) if need_cls else max(wanted)
    out = {}
    for i, block in enumerate(backbone.blocks, start=1):
        if i > last:
            break
        x = block(x)
        if i in wanted:
            nld = x if bf else x.transpose(0, 1)
            out[str(i)] = nld[:, 1:].reshape(n, gh, gw, c)
    cls_token = None
    if need_cls:
        cls_token = (x if bf else x.transpose(0, 1))[:, 0]
    return {str(i): out[str(i)] for i in layer_ids}, cls_token


def class_token_forward(backbone, x: torch.Tensor, layer_ids, autocast_dtype: torch.dtype | None = None):
    """:func:`vit_forward` with the class token, under autocast when ``autocast_dtype`` is given; float32
    outputs (the per-image classifiers APRIL-GAN and VCP-CLIP read both)."""
    device = backbone.device
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        toks, cls = vit_forward(backbone, x.to(device), layer_ids, need_cls=True)
    return {k: v.float() for k, v in toks.items()}, cls.float()


def nearest_selection(q: torch.Tensor, ref: torch.Tensor, exclude: torch.Tensor, k: int,
                      chunk: int = 2**25) -> tuple[torch.Tensor, torch.Tensor]:
    """For queries ``q`` ``[B, L, C]`` and references ``ref`` ``[G, L', C]`` (no gradient): the ``k``
    reference images nearest to each query patch (by min patch distance; image ``exclude[b]`` left
    out for query b) and, for each, the index of its nearest patch. Returns ``(images, patches)``,
    both ``[B, L, k]`` int64."""
    b, L, c = q.shape
    g, L2, _ = ref.shape
    qf = q.reshape(-1, c).float()
    q_sq = (qf * qf).sum(1, keepdim=True)
    rf = ref.float()
    r_sq = (rf * rf).sum(-1)
    step = max(1, chunk // max(1, qf.shape[0] * L2))
    dmin = torch.empty((b * L, g), dtype=torch.float32, device=q.device)
    amin = torch.empty((b * L, g), dtype=torch.long, device=q.device)
    for g0 in range(0, g, step):
        g1 = min(g, g0 + step)
        d2 = torch.addmm(q_sq + r_sq[g0:g1].reshape(1, -1), qf, rf[g0:g1].reshape(-1, c).T, beta=1.0, alpha=-2.0)
        val, idx = d2.view(b * L, g1 - g0, L2).min(-1)
        dmin[:, g0:g1], amin[:, g0:g1] = val, idx
    dmin = dmin.view(b, L, g)
    amin = amin.view(b, L, g)
    dmin[torch.arange(b, device=q.device), :, exclude.to(q.device)] = float("inf")
    images = torch.topk(dmin, k, dim=-1, largest=False).indices
    return images, amin.gather(-1, images)


def selected_scores(q: torch.Tensor, ref: torch.Tensor, images: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """MSM scores ``[B, L]`` of ``q`` ``[B, L, C]`` (with gradient) from the selected nearest patches:
    mean over the k selected images of ``||q - ref[image, patch]||``."""
    picked = ref[images, patches]  # [B, L, k, C]
    d2 = (q[:, :, None, :].float() - picked.float()).pow(2).sum(-1)
    return d2.clamp_min(1e-12).sqrt().mean(-1)


class MuscTTA:
    """:class:`~anorefiner.tta.common.TTABackend` for MuSc over an open_clip ViT (see module doc)."""

    uses_ln_post = False
    image_loss = False

    def __init__(self, backbone, musc: MuscConfig | None = None, config: MuscTTAConfig | None = None,
                 seed: int = 0, autocast_dtype: torch.dtype | None = None, name: str = "musc"):
        if not hasattr(backbone, "visual") or not hasattr(backbone, "pos_embed"):
            raise ValueError(f"tta: MuSc adaptation needs an open_clip ViT backbone, got {backbone!r}")
        self.backbone, self.visual, self.device = backbone, backbone.visual, backbone.device
        self.musc = musc or MuscConfig()
        self.config = config or MuscTTAConfig()
        if self.config.image_calibration not in ("image", "patch"):
            raise ValueError(f"tta musc.image_calibration must be 'image' or 'patch', got {self.config.image_calibration!r}")
        if not 0.0 < self.config.query_fraction <= 1.0:
            raise ValueError(f"tta musc.query_fraction must be in (0, 1], got {self.config.query_fraction}")
        self.name, self.seed, self.autocast_dtype = name, int(seed), autocast_dtype
        layers = list(self.musc.layers) if self.musc.layers else list(backbone.layers)
        missing = [x for x in layers if x not in backbone.layers]
        if missing:
            raise ValueError(f"tta: MuSc layers {missing} are not layers of the backbone {backbone.layers}")
        self.layers = layers
        self._calls = 0
        self._emb: dict[int, np.ndarray] = {}

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _tokens(self, x: torch.Tensor, need_cls: bool):
        with self._autocast():
            layers, cls = vit_forward(self.backbone, x, self.layers, need_cls)
        return {k: v.float() for k, v in layers.items()}, (cls.float() if cls is not None else None)

    # ---------------------------------------------------------------- group context (no gradient)
    def begin_group(self, x: torch.Tensor, calibrate: bool = True) -> None:
        parts, cls = {k: [] for k in self.layers}, []
        with torch.no_grad():
            for s in range(0, len(x), self.config.forward_batch):
                toks, c = self._tokens(x[s : s + self.config.forward_batch].to(self.device), need_cls=True)
                for k in self.layers:
                    parts[k].append(toks[k])
                cls.append(c)
            self.tokens = {k: torch.cat(v) for k, v in parts.items()}
            self.cls = torch.cat(cls)
            g, h, w, _ = self.tokens[self.layers[0]].shape
            if g < 2:
                raise ValueError("tta: a MuSc group needs at least 2 images (mutual scoring)")
            l2 = self.musc.l2_normalize
            self.refs = {k: lnamd(t, 1, l2).reshape(g, h * w, -1) for k, t in self.tokens.items()}
            if calibrate:
                self._calibrate()

    def _robust(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(median + k * 1.4826 MAD, 1.4826 MAD)`` of ``s`` (medians as numpy's: mean of the middle pair)."""
        med = torch.quantile(s, 0.5)
        t = (MAD_TO_SIGMA * torch.quantile((s - med).abs(), 0.5)).clamp_min(self.config.min_scale)
        return med + self.config.calib_k * t, t

    def _calibrate(self) -> None:
        tau, scale, zs = [], [], []
        for k in self.layers:
            s = msm(self.refs[k], self.musc.topmin, self.musc.chunk)  # [G, L]
            t, sc = self._robust(s.flatten())
            tau.append(t)
            scale.append(sc)
            zs.append((s - t) / sc)
        self.tau = torch.stack(tau)
        self.scale = torch.stack(scale)
        self.image_tau, self.image_scale = torch.zeros((), device=self.device), torch.ones((), device=self.device)
        if self.config.image_calibration == "image":
            self.image_tau, self.image_scale = self._robust(torch.stack(zs, 1).mean(1).amax(-1))
        n_patches = self.refs[self.layers[0]].shape[1]
        self.query_idx = None
        if self.config.query_fraction < 1.0:
            from .common import torch_generator

            gen = torch_generator(self.seed, "tta-musc-queries", self._calls)
            m = max(1, int(round(n_patches * self.config.query_fraction)))
            self.query_idx = torch.randperm(n_patches, generator=gen)[:m].sort().values.to(self.device)
        self._calls += 1

    # ---------------------------------------------------------------- differentiable units
    def units(self, x: torch.Tensor, positions: torch.Tensor) -> Units:
        toks, _ = self._tokens(x, need_cls=False)
        g = self.refs[self.layers[0]].shape[0]
        k = effective_k(g - 1, self.musc.topmin)
        positions = torch.as_tensor(positions, dtype=torch.long)
        zs = []
        for li, name in enumerate(self.layers):
            t = toks[name]
            q = lnamd(t, 1, self.musc.l2_normalize).reshape(t.shape[0], -1, t.shape[-1])
            if self.query_idx is not None:
                q = q[:, self.query_idx]
            with torch.no_grad():
                images, patches = nearest_selection(q.detach(), self.refs[name], positions, k, self.musc.chunk)
            s = selected_scores(q, self.refs[name], images, patches)
            zs.append((s - self.tau[li]) / self.scale[li])
        z = torch.stack(zs, 1)  # [B, layers, L]
        patch = torch.stack([torch.zeros_like(z), z], -1).reshape(z.shape[0], -1, 2)
        zi = (z.mean(1).amax(-1) - self.image_tau) / self.image_scale
        image = torch.stack([torch.zeros_like(zi), zi], -1)
        return Units(patch=patch, image=image)

    # ---------------------------------------------------------------- prediction (no gradient)
    def predict(self, x: torch.Tensor, index) -> tuple[np.ndarray, np.ndarray]:
        """Maps and raw scores of the group whose tokens :meth:`begin_group` computed."""
        m = self.musc
        with torch.no_grad():
            maps = score(self.tokens, m.r_list, m.topmin, l2_normalize=m.l2_normalize, chunk=m.chunk,
                         device=self.device)
            if m.rscin:
                emb = self.backbone.image_embedding(self.cls).float().cpu().numpy()
                for j, i in enumerate(np.asarray(index)):
                    self._emb[int(i)] = emb[j]
        maps = maps.float().cpu().numpy()
        return maps, maps.reshape(len(maps), -1).max(1)

    def finalize_scores(self, scores: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
        """RsCIN over each group (``rscin_scope: group``, MuSc*'s default) or over all images."""
        m = self.musc
        if not m.rscin:
            return scores.astype(np.float32)
        from ..zsad.musc.backend import RSCIN_K_LISTS

        k_list = tuple(m.k_list) if m.k_list is not None else RSCIN_K_LISTS.get(m.dataset, RSCIN_K_LISTS["mvtec_ad"])
        emb = np.stack([self._emb[i] for i in range(len(scores))])
        out = scores.astype(np.float32).copy()
        scopes = groups if m.rscin_scope == "group" else [np.arange(len(scores))]
        for g in scopes:
            out[g] = rscin(scores[g], emb[g], k_list)
        return out
