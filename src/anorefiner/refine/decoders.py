"""Baseline decoders of Table 12 (supplement F): DeSTSeg, RealNet and U-Net heads in place of the ARD.

They take the ARD's inputs (features ``[B,C,h,w]``, coarse map ``[B,1,h,w]``) and return logits
``[B,1,R,R]``. The paper says these decoders "lack explicit guidance from the anomaly map": the
coarse map is simply concatenated to the features as one more input channel (no AnoB, AA or BI).
Widths follow the reference networks named in specs/methods.md; ``config.feat_channels`` sets the
widest layer so the CPU preset can shrink them like the ARD.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .layers import conv_bn_relu

if TYPE_CHECKING:  # annotations only: .ard builds these decoders
    from .ard import ARDConfig

BASELINES = ("destseg", "realnet", "unet")


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(cin, cout, 3, norm), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


class _Baseline(nn.Module):
    """Shared input handling: concat(F, A) in, logits resized to the input resolution out."""

    def __init__(self, patch_stride):
        super().__init__()
        self.patch_stride = patch_stride

    def forward(self, features, coarse, out_size=None):
        if features.shape[-2:] != coarse.shape[-2:]:
            coarse = F.interpolate(coarse, size=features.shape[-2:], mode="bilinear", align_corners=True)
        h, w = features.shape[-2:]
        size = tuple(out_size) if out_size is not None else (int(round(h * self.patch_stride)),
                                                             int(round(w * self.patch_stride)))
        logits = self.net(torch.cat([features, coarse], dim=1))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class DeSTSegDecoder(_Baseline):
    """DeSTSeg segmentation net: 2 residual blocks → ASPP (rates 6/12/18) → 3×3 conv + BN + ReLU → 1×1 conv."""

    def __init__(self, in_channels, config: ARDConfig, patch_stride):
        super().__init__(patch_stride)
        c, norm = config.feat_channels, config.norm
        self.res = nn.Sequential(_Residual(in_channels + 1, c, norm), _Residual(c, c, norm))
        self.aspp = nn.ModuleList([conv_bn_relu(c, c, 1, norm)] + [
            nn.Sequential(nn.Conv2d(c, c, 3, padding=r, dilation=r, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            for r in (6, 12, 18)])
        self.out = nn.Sequential(conv_bn_relu(4 * c, c, 3, norm), nn.Conv2d(c, 1, 1))

    def net(self, x):
        x = self.res(x)
        return self.out(torch.cat([branch(x) for branch in self.aspp], dim=1))


class RealNetDecoder(_Baseline):
    """RealNet discriminator: residual stack → 128 → 32 → 8 → ×2 → 4 → 2 channels; logit = ch1 − ch0
    (sigmoid of it equals softmax[:, 1])."""

    def __init__(self, in_channels, config: ARDConfig, patch_stride):
        super().__init__(patch_stride)
        c, norm = config.feat_channels, config.norm
        w = max(c // 2, 8)  # 128 at the paper width 256
        self.body = nn.Sequential(_Residual(in_channels + 1, c, norm), _Residual(c, c, norm),
                                  conv_bn_relu(c, w, 3, norm), conv_bn_relu(w, 32, 3, norm), conv_bn_relu(32, 8, 3, norm))
        self.tail = nn.Sequential(conv_bn_relu(8, 4, 3, norm), nn.Conv2d(4, 2, 1))

    def net(self, x):
        x = self.body(x)
        x = self.tail(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return x[:, 1:2] - x[:, 0:1]


class UNetDecoder(_Baseline):
    """U-Net decoder (Ronneberger 2015) on one input scale: double-conv stages with ×2 upsampling,
    halving the width, then a 1×1 head."""

    def __init__(self, in_channels, config: ARDConfig, patch_stride, stages: int = 2):
        super().__init__(patch_stride)
        c, norm = config.feat_channels, config.norm
        layers: list[nn.Module] = [conv_bn_relu(in_channels + 1, c, 3, norm), conv_bn_relu(c, c, 3, norm)]
        for _ in range(stages):
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       conv_bn_relu(c, c // 2, 3, norm), conv_bn_relu(c // 2, c // 2, 3, norm)]
            c = max(c // 2, 1)
        layers.append(nn.Conv2d(c, 1, 1))
        self.body = nn.Sequential(*layers)

    def net(self, x):
        return self.body(x)


def build_decoder(name: str, in_channels: int, config: ARDConfig, *, grid=None, patch_stride=14) -> nn.Module:
    """A Table 12 baseline by name (``ard.decoder``)."""
    classes = {"destseg": DeSTSegDecoder, "realnet": RealNetDecoder, "unet": UNetDecoder}
    if name not in classes:
        raise ValueError(f"ard.decoder={name!r}: expected 'ard' or one of {BASELINES}")
    return classes[name](in_channels, config, patch_stride)
