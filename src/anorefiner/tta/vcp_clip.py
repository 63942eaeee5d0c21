"""VCP-CLIP as a test-time-adaptation backend (tta.md A.5 P2(a), P4): Table 1's "VCP-CLIP + TIPI/SAR/DeYO".

VCP-CLIP is a 2-class classifier per token in two branches, so its own logits are the TTA units:

* **patch units**: per tapped layer, branch (raw linear branch and Post-VCP) and token of the token grid
  (before upsampling, so each token counts once), the logits ``exp(tau) * <token, text>`` over
  (normal, abnormal) (:meth:`anorefiner.zsad.vcp_clip.backend.VcpModel.layer_logits`, ``VCP-CLIP:test.py`` l.150-191);
* **image unit** (DeYO's PLPD only, not in the loss): VCP-CLIP has no image-level softmax; A.5 P4 takes
  ``p_abn`` of the image's max-pooled map: here the maximum over tokens of the token-level map
  ``alpha * raw + (1 - alpha) * new`` (layer means of the abnormal probabilities), as logits
  ``(log(1 - p), log p)``.

The text embeddings depend on the image (Pre-VCP reads ``ln_post(CLS) @ proj``), so the adapted vision
LayerNorms move the text side too and ``ln_post`` is in use. VCP-CLIP's trained parts stay frozen.
Prediction: the backend's smoothed maps and scores at the current weights, *without* the class-stack
min-max (a group sees only its own images; the min-max over the category is monotone, so the
category's pooled metrics do not depend on it).
"""

from __future__ import annotations

import numpy as np
import torch

from .common import Units
from .april_gan import PerImageTTA


class VcpClipTTA(PerImageTTA):
    """:class:`~anorefiner.tta.common.TTABackend` over a :class:`~anorefiner.zsad.vcp_clip.backend.VcpClipBackend`."""

    image_loss = False
    title = "VCP-CLIP"

    def __init__(self, zsad, autocast_dtype: torch.dtype | None = None, name: str = "vcp_clip"):
        super().__init__(zsad, autocast_dtype, name)
        zsad.model.eval().requires_grad_(False)

    def units(self, x: torch.Tensor, positions) -> Units:
        toks, cls = self._forward(x)
        b, h, w, c = toks[self.layers[0]].shape
        v = self.visual
        g = v.ln_post(cls)
        if v.proj is not None:
            g = g @ v.proj
        model = self.zsad.model
        text = model.text(self.backbone, self.zsad.tokens, g)
        raw, new = model.layer_logits([toks[k].reshape(b, h * w, c) for k in self.layers], text, (h, w))
        patch = torch.cat([lg.flatten(2).transpose(1, 2) for lg in raw + new], 1)
        alpha = self.zsad.config.alpha
        p_raw = sum(torch.softmax(lg, 1)[:, 1] for lg in raw) / len(raw)
        p_new = sum(torch.softmax(lg, 1)[:, 1] for lg in new) / len(new)
        p = (alpha * p_raw + (1 - alpha) * p_new).flatten(1).amax(1).clamp(1e-6, 1 - 1e-6)
        image = torch.stack([torch.log1p(-p), torch.log(p)], dim=1)
        return Units(patch=patch, image=image)

    def predict(self, x: torch.Tensor, index=None) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = [], []
        bs = self.zsad.config.batch_size
        with torch.no_grad():
            for s in range(0, len(x), bs):
                toks, cls = self._forward(x[s : s + bs])
                m, sc, _, _ = self.zsad._maps(toks, cls)
                maps.append(m)
                scores.append(sc)
        return np.concatenate(maps).astype(np.float32), np.concatenate(scores).astype(np.float32)
