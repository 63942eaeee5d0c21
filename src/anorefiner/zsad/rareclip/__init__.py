"""RareCLIP (ICCV 2025): a trained text branch plus a training-free online rarity memory per category.

* :mod:`.backend`: :class:`RareClipBackend`, :class:`RareClipConfig` and the test stream;
* :mod:`.memory`: the rarity memory;
* :mod:`.train`: training of the text branch on the auxiliary dataset (rule ``train_backend``).
"""

from .backend import RareClipBackend, RareClipConfig
from .memory import RarityBank
from .train import TrainConfig, check_checkpoint, train_backend

__all__ = ["RareClipBackend", "RareClipConfig", "RarityBank", "TrainConfig", "check_checkpoint", "train_backend"]
