"""Fixtures of the TTA tests: the tiny random CLIP tower, a group of images, and a toy backend
(a fixed linear 2-class head on the last block's tokens) that gives every method image units too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anorefiner.tta.common import Units
from anorefiner.tta.musc import vit_forward

RES = 56  # 4 x 4 patches of the tiny model (patch 14)


@pytest.fixture
def tiny_vit(tiny_clip):
    from anorefiner.backbones import build_backbone

    return build_backbone(tiny_clip, RES, pretrained=None, seed=0)


@pytest.fixture
def group_images():
    return torch.randn(6, 3, RES, RES, generator=torch.Generator().manual_seed(3))


class LinearHeadBackend:
    """A TTA backend with a classifier: patch logits = tokens of the last block @ W, image logits =
    mean token @ W2 (fixed random heads). Scale ``s`` sharpens the logits so selections are mixed."""

    uses_ln_post = False
    image_loss = True
    name = "linear_head"

    def __init__(self, backbone, scale: float = 3.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        c = backbone.width
        self.backbone, self.visual, self.device = backbone, backbone.visual, backbone.device
        self.w = torch.randn(c, 2, generator=g) * scale / c**0.5
        self.w2 = torch.randn(c, 2, generator=g) * scale / c**0.5
        self.layer = backbone.layers[-1]

    def begin_group(self, x, calibrate=True):
        pass

    def units(self, x, positions):
        toks, _ = vit_forward(self.backbone, x, [self.layer])
        t = toks[self.layer].reshape(x.shape[0], -1, self.w.shape[0])
        t = torch.nn.functional.layer_norm(t, t.shape[-1:])
        return Units(patch=t @ self.w, image=t.mean(1) @ self.w2)

    def predict(self, x, index):
        with torch.no_grad():
            u = self.units(x, None)
        p = torch.softmax(u.patch, -1)[..., 1].reshape(len(x), *self.backbone.grid)
        return p.numpy(), torch.softmax(u.image, -1)[:, 1].numpy()

    def finalize_scores(self, scores, groups):
        return np.asarray(scores, dtype=np.float32)


@pytest.fixture
def head_backend(tiny_vit):
    return LinearHeadBackend(tiny_vit)
