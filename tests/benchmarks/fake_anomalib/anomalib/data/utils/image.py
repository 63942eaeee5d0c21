"""read_image: an RGB float tensor in [0, 1] (the fake anomalib, see anomalib/__init__.py)."""

import numpy as np
import torch
from PIL import Image


def read_image(path, as_tensor=True):
    assert as_tensor
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255.0
