"""WinClip.configure_pre_processor: resize the float image (antialiased bicubic) to 42 px, CLIP normalisation."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


class WinClip:
    @classmethod
    def configure_pre_processor(cls):
        def transform(image):
            x = F.interpolate(image[None], size=(42, 42), mode="bicubic", align_corners=False, antialias=True)[0]
            return (x - MEAN) / STD
        return SimpleNamespace(transform=transform)
