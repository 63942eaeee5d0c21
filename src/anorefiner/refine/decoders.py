"""Baseline decoders of Table 12 (DeSTSeg, RealNet, U-Net) taking the ARD's inputs."""

from __future__ import annotations

BASELINES = ("destseg", "realnet", "unet")


def build_decoder(name: str, in_channels: int, config, *, grid, patch_stride):
    if name not in BASELINES:
        raise ValueError(f"ard.decoder={name!r}: expected 'ard' or one of {BASELINES}")
    raise NotImplementedError(f"ard.decoder={name!r} (Table 12 baseline decoder) is not implemented yet")
