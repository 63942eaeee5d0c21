"""Parity adapter for the fake official module (tests/benchmarks/fake_official): exercises the harness core.

``ANOREFINER_PARITY_FAKE_DEVIATION=1`` in the environment makes *ours* resize with the antialiased bicubic,
so the position-embedding and map stages must fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

REPO = "anorefiner/fake-official"
COMMIT = "0000000"
PINNED = {"official_model.py": "eefae79929574183e7eae044e023ef2029b3f40a"}
DEFAULTS = {"image_size": 28, "old_grid": 3, "new_grid": 5, "width": 6}
STAGES = [("preprocessing", "squash-resized RGB image"), ("position_embedding", "resized position embedding"),
          ("maps", "patch probabilities")]
CHOICES = [("maps_antialiased", "maps", "antialiased bicubic resize (a project choice, reported only)")]


def _inputs(spec):
    g = torch.Generator().manual_seed(spec["seed"])
    pos = torch.randn(1 + spec["old_grid"] ** 2, spec["width"], generator=g)
    text = torch.nn.functional.normalize(torch.randn(2, spec["width"], generator=g), dim=-1)
    return pos, text


def official(root: Path, spec: dict) -> dict:
    import official_model

    assert Path(official_model.__file__).resolve().parent == root  # the clone's file, not a copy
    pos, text = _inputs(spec)
    resized = official_model.resize_pos(pos, spec["old_grid"], spec["new_grid"])
    images = [official_model.load(p, spec["image_size"]) for p in spec["images"]]
    return {"preprocessing": images, "position_embedding": resized,
            "maps": official_model.patch_probs(resized[1:], text)}


def ours(spec: dict, official: dict) -> dict:
    import numpy as np
    from PIL import Image

    from anorefiner.backbones.clip_vit import interpolate_pos_embed
    from anorefiner.data.index import load_image

    pos, text = _inputs(spec)
    grids = (spec["old_grid"],) * 2, (spec["new_grid"],) * 2
    mode = "bicubic" if os.environ.get("ANOREFINER_PARITY_FAKE_DEVIATION") else "bicubic_no_antialias"
    s = spec["image_size"]

    def maps(m):
        tokens = torch.nn.functional.normalize(interpolate_pos_embed(pos, *grids, mode=m)[1:], dim=-1)
        return torch.softmax(100.0 * tokens @ text.T, dim=-1)[..., 1]

    images = [np.asarray(Image.fromarray(load_image(p)).resize((s, s), Image.BICUBIC), np.float32) / 255.0
              for p in spec["images"]]
    return {"preprocessing": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2),
            "position_embedding": interpolate_pos_embed(pos, *grids, mode=mode),
            "maps": maps(mode), "maps_antialiased": maps("bicubic")}
