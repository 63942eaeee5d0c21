"""APRIL-GAN (VAND 2023), zero-shot mode: linear adapters on CLIP patch tokens.

* :mod:`.backend`: :class:`AprilGanBackend`, :class:`AprilGanConfig`, the adapters and their maps
  (also the building blocks of VCP-CLIP, RareCLIP and AdaCLIP);
* :mod:`.train`: training of the adapters on the auxiliary dataset (rule ``train_backend``) and the
  losses, samples and mosaics the other trainers share.
"""

from .backend import AprilGanBackend, AprilGanConfig, LinearAdapters, load_adapters
from .train import TrainConfig, check_checkpoint, train_backend

__all__ = ["AprilGanBackend", "AprilGanConfig", "LinearAdapters", "TrainConfig", "check_checkpoint",
           "load_adapters", "train_backend"]
