"""Bayes-PFL (CVPR 2025): Bayesian prompt flow learning with image-specific and image-agnostic prompt flows.

* :mod:`.backend`: :class:`BayesPflBackend`, :class:`BayesPflConfig`, the Monte-Carlo maps and scores, the checkpoint;
* :mod:`.model`: the prompt bank, the planar prompt flows, RCA, the fuse and mapping layers, the losses;
* :mod:`.prompts`: the class sentence and the prompted text tower;
* :mod:`.train`: the two training stages on the auxiliary dataset (rule ``train_backend``).
"""

from .backend import BayesPflBackend, BayesPflConfig, load_model
from .train import TrainConfig, check_checkpoint, train_backend

__all__ = ["BayesPflBackend", "BayesPflConfig", "TrainConfig", "check_checkpoint", "load_model", "train_backend"]
