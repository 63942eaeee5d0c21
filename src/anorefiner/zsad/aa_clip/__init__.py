"""AA-CLIP (CVPR 2025): anomaly-aware CLIP through residual adapters in both towers, trained in two stages.

* :mod:`.backend`: :class:`AaClipBackend`, :class:`AaClipConfig`, the maps and scores, the checkpoint;
* :mod:`.model`: the adapters and the adapted text, adapted visual and "surgery" forwards;
* :mod:`.prompts`: the official states, templates and class descriptions;
* :mod:`.train`: the two training stages on the auxiliary dataset (rule ``train_backend``).
"""

from .backend import AaClipBackend, AaClipConfig, load_adapters
from .train import TrainConfig, check_checkpoint, train_backend

__all__ = ["AaClipBackend", "AaClipConfig", "TrainConfig", "check_checkpoint", "load_adapters", "train_backend"]
