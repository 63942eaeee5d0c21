"""A tiny stand-in for an official repository (tests of benchmarks/parity only; written for this project).

It reads an image as the official datasets do (PIL, RGB), squash-resizes it bicubically, resizes a position
embedding with plain bicubic (no antialias, as AdaCLIP's resize_pos_embed) and scores patch tokens against
two text vectors with a softmax at temperature 100.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def load(path, size):
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)


def resize_pos(pos, old, new):
    grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(new * new, -1)])


def patch_probs(tokens, text):
    tokens = tokens / tokens.norm(dim=-1, keepdim=True)
    return torch.softmax(100.0 * tokens @ text.T, dim=-1)[..., 1]
