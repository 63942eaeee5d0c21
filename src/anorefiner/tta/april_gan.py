"""APRIL-GAN as a test-time-adaptation backend (tta.md A.5 P2(a)).

APRIL-GAN is a 2-class classifier per token, so its own outputs are the TTA units:

* **patch units**: per tapped layer and token of the token grid (before upsampling, so each token
  counts once), the logits ``100 * <normalize(Linear_l(token)), T>`` over (normal, abnormal)
  (:func:`anorefiner.zsad.april_gan.backend.layer_logits`, ``VAND-APRIL-GAN:test.py:L168-176``);
* **image unit**: ``100 * <normalize(ln_post(CLS) @ proj), T>``, the official image score's logits;
  it enters the loss (equal weight to the patch term) and is DeYO's PLPD unit (A.5 P4).

The linear adapters and the text embeddings stay frozen; only the vision tower's LayerNorm affine
parameters adapt. ``ln_post`` feeds the image unit, so TIPI adapts it (SAR/DeYO leave the final
norm frozen, as their official rule). Prediction: the APRIL-GAN maps and scores of the group at the
current weights (:class:`anorefiner.zsad.april_gan.backend.AprilGanBackend`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..zsad.april_gan.backend import full_map, image_scores, layer_logits, patch_map
from .common import Units
from .musc import class_token_forward


class PerImageTTA:
    """What the TTA backends over a per-image CLIP classifier share (APRIL-GAN here, VCP-CLIP in
    :mod:`.vcp_clip`): the zero-shot backend ``zsad`` on an open_clip ViT, the tapped layers and the class
    token of one forward, no group context, raw image scores kept."""

    uses_ln_post = True
    title = "a per-image backend"

    def __init__(self, zsad, autocast_dtype: torch.dtype | None = None, name: str = ""):
        backbone = zsad.backbone
        if not hasattr(backbone, "visual") or not hasattr(backbone, "pos_embed"):
            raise ValueError(f"tta: {self.title} adaptation needs an open_clip ViT backbone, got {backbone!r}")
        if torch.device(zsad.device) != torch.device(backbone.device):
            raise ValueError(f"tta: {self.title} runs on {zsad.device} but its backbone on {backbone.device}")
        self.zsad, self.backbone, self.visual = zsad, backbone, backbone.visual
        self.device, self.name, self.autocast_dtype = backbone.device, name, autocast_dtype
        self.layers = list(backbone.layers)

    def _forward(self, x: torch.Tensor):
        return class_token_forward(self.backbone, x, self.layers, self.autocast_dtype)

    def begin_group(self, x: torch.Tensor, calibrate: bool = True) -> None:
        """Each image is scored on its own: no group context."""

    def finalize_scores(self, scores: np.ndarray, groups) -> np.ndarray:
        return np.asarray(scores, dtype=np.float32)


class AprilGanTTA(PerImageTTA):
    """:class:`~anorefiner.tta.common.TTABackend` over an :class:`~anorefiner.zsad.april_gan.backend.AprilGanBackend`."""

    image_loss = True
    title = "APRIL-GAN"

    def __init__(self, zsad, autocast_dtype: torch.dtype | None = None, name: str = "april_gan"):
        super().__init__(zsad, autocast_dtype, name)

    def units(self, x: torch.Tensor, positions) -> Units:
        toks, cls = self._forward(x)
        b, h, w, c = toks[self.layers[0]].shape
        feats = self.zsad.adapters([toks[k].reshape(b, h * w, c) for k in self.layers])
        temp = self.zsad.config.temperature
        patch = torch.cat([layer_logits(p, self.zsad.text, (h, w), temp).flatten(2).transpose(1, 2) for p in feats], 1)
        v = self.visual
        g = v.ln_post(cls)
        if v.proj is not None:
            g = g @ v.proj
        image = temp * F.normalize(g, dim=-1) @ F.normalize(self.zsad.text.float(), dim=-1).T
        return Units(patch=patch, image=image)

    def predict(self, x: torch.Tensor, index) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            maps, scores = [], []
            for s in range(0, len(x), self.zsad.config.batch_size):
                toks, cls = self._forward(x[s : s + self.zsad.config.batch_size])
                b, h, w, c = toks[self.layers[0]].shape
                feats = self.zsad.adapters([toks[k].reshape(b, h * w, c) for k in self.layers])
                logits = [layer_logits(p, self.zsad.text, (h, w), self.zsad.config.temperature) for p in feats]
                maps.append(patch_map(full_map(logits, self.zsad.map_size), (h, w)).cpu())
                emb = self.backbone.image_embedding(cls, normalize=True).float()
                scores.append(image_scores(emb, self.zsad.text, self.zsad.config.temperature).cpu())
        return torch.cat(maps).numpy().astype(np.float32), torch.cat(scores).numpy().astype(np.float32)
