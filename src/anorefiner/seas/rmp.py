"""SeaS's Refined Mask Prediction (RMP) head: the masks of generated anomalies
(HUST-SLOW/SeaS 4645d3b ``models/modules/_RMP.py`` L121-L311).

Coarse branch (L266-L272): the U-Net's up-block outputs at latent/2 (1×1 conv to 128 channels, bilinear to the
latent size) and at the latent size (1×1 conv to 64) are concatenated (192 channels) and pass four
self-attention transformer blocks (diffusers' ``Transformer2DModel``, 8 heads, GroupNorm 32; the official
``UNetMidBlock2DCrossAttn`` with ``do_self_attn`` is only that). Refinement (L285-L287): one Mask Refinement
Module (MRM, L121-L201) per VAE-decoder up block below the image size (SD: 128, 256, 512 px) doubles the
resolution and gates the VAE features with the coarse ones. Head (L231-L236): BatchNorm, ReLU, 3×3 conv to two
classes, softmax. The official ``bn`` layer (L10-L41) is a BatchNorm2d with momentum 0.1 and eps 1e-5.

Training (L281-L297) refines the anomaly half of the batch and upsamples the normal half's coarse features
(Normal-image Alignment); both also give a coarse prediction at the latent size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _unit(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class MRM(nn.Module):
    """Mask Refinement Module: ``conv1(fine) · (trunk + skip1 + branch) + coarse`` at twice the coarse size."""

    def __init__(self, fine_channels: int, channels: int):
        super().__init__()
        self.fine = _unit(fine_channels, channels, 1)  # conv1
        self.skip = _unit(channels, channels, 1)  # conv5
        self.trunk = nn.Sequential(_unit(channels, channels, 1), _unit(channels, channels, 3),
                                   _unit(channels, channels, 1))  # conv2-conv4
        self.branch = nn.Sequential(_unit(channels, channels, 1), _unit(channels, channels, 3),
                                    _unit(channels, channels, 1))  # conv7-conv9 on conv4's output

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        coarse = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=True)
        trunk = self.trunk(coarse)
        gate = trunk + self.skip(coarse) + self.branch(trunk)
        return self.fine(fine) * gate + coarse


class RMP(nn.Module):
    """``unet_channels``: channels of the U-Net features at latent/2 and latent; ``vae_channels``: channels of the
    VAE-decoder features, coarsest first."""

    def __init__(self, unet_channels, vae_channels, widths=(128, 64), heads: int = 8, layers: int = 4,
                 groups: int = 32):
        super().__init__()
        from diffusers import Transformer2DModel

        c = int(sum(widths))
        self.low = nn.Conv2d(int(unet_channels[0]), int(widths[0]), 1, bias=False)
        self.mid = nn.Conv2d(int(unet_channels[1]), int(widths[1]), 1, bias=False)
        self.attention = Transformer2DModel(num_attention_heads=heads, attention_head_dim=c // heads, in_channels=c,
                                            num_layers=layers, norm_num_groups=groups, cross_attention_dim=None)
        self.mrms = nn.ModuleList(MRM(int(v), c) for v in vae_channels)
        self.head = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 2, 3, padding=1))

    def coarse(self, low: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
        low = F.interpolate(self.low(low), size=mid.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.cat([low, self.mid(mid)], dim=1)
        return self.attention(x, return_dict=False)[0]

    def refine(self, coarse: torch.Tensor, vae_features) -> torch.Tensor:
        for mrm, fine in zip(self.mrms, vae_features):
            coarse = mrm(coarse, fine)
        return coarse

    def forward(self, low, mid, vae_features, image_size: int, train: bool = False):
        """Inference: class probabilities ``[B,2,S,S]`` of the refined masks. Training (the first half of the batch
        anomalous, the second normal; ``vae_features`` of the anomalous half): ``(probs [B,2,S,S], probs at the
        latent size)``."""
        coarse = self.coarse(low, mid)
        if not train:
            return torch.softmax(self.head(self.refine(coarse, vae_features)), dim=1)
        anomalous, normal = torch.chunk(coarse, 2, dim=0)
        normal = F.interpolate(normal, size=(image_size, image_size), mode="bilinear", align_corners=False)
        out = torch.cat([self.refine(anomalous, vae_features), normal], dim=0)
        return torch.softmax(self.head(out), dim=1), torch.softmax(self.head(coarse), dim=1)
