"""Layers shared by the ARD (:mod:`.ard`) and the Table 12 baseline decoders (:mod:`.decoders`)."""

from __future__ import annotations

from torch import nn


def conv_bn_relu(cin: int, cout: int, k: int, norm: str) -> nn.Sequential:
    """k×k conv (same padding) + optional BatchNorm + ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=norm == "none")]
    if norm == "bn":
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
