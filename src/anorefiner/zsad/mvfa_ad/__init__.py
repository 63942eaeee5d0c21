"""MVFA-AD (Huang et al., CVPR 2024), few-shot: multi-level residual adapters in CLIP's image tower, trained on the
k normal shots, and a memory of the shots' adapted tokens.

* :mod:`.backend`: :class:`MvfaBackend`, :class:`MvfaConfig`, the adapters, their forward and the two maps;
* :mod:`.train`: training of the adapters on the augmented shots (rule ``train_fewshot``).
"""

from .backend import MvfaBackend, MvfaConfig
from .train import TrainConfig, check_checkpoint, train_fewshot

__all__ = ["MvfaBackend", "MvfaConfig", "TrainConfig", "check_checkpoint", "train_fewshot"]
