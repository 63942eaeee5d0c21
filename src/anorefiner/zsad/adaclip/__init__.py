"""AdaCLIP (ECCV 2024): hybrid static + dynamic prompts in both CLIP towers, per-layer heads and HSF.

* :mod:`.backend`: :class:`AdaClipBackend`, :class:`AdaClipConfig` and the forward pass;
* :mod:`.prompts`: the learnable prompts and heads, the prompted CLIP forwards and the checkpoint;
* :mod:`.train`: training on the auxiliary dataset (rule ``train_backend``).
"""

from .backend import AdaClipBackend, AdaClipConfig
from .train import TrainConfig, check_checkpoint, train_backend

__all__ = ["AdaClipBackend", "AdaClipConfig", "TrainConfig", "check_checkpoint", "train_backend"]
