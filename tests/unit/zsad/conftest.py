"""Fixtures shared by the backend tests: the tiny random CLIP at 56 px (a 4 x 4 token grid) and its float64 copy."""

from __future__ import annotations

import copy

import pytest


@pytest.fixture(scope="module")
def tiny56(tiny_clip):
    from anorefiner.backbones import build_backbone

    return build_backbone(tiny_clip, 56, pretrained=None, seed=0)


@pytest.fixture(scope="module")
def tiny64(tiny56):
    """A float64 copy of the tiny CLIP (the same weights)."""
    bb = copy.copy(tiny56)
    bb.model = copy.deepcopy(tiny56.model).double()
    bb.visual = bb.model.visual
    bb.pos_embed = tiny56.pos_embed.double()
    return bb
