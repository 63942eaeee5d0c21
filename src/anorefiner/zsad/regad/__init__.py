"""RegAD (Huang et al., ECCV 2022), few-shot by registration: an STN ResNet-18 trained on the dataset's other
categories, then a per-position Gaussian of the k augmented normal shots' registered features.

* :mod:`.model`: the STN ResNet-18 and the Siamese encoder/predictor;
* :mod:`.backend`: :class:`RegADBackend`, :class:`RegADConfig`, the Gaussian and the Mahalanobis maps;
* :mod:`.train`: the leave-one-category-out meta-training (rule ``train_fewshot``).
"""

from .backend import RegADBackend, RegADConfig
from .train import TrainConfig, check_checkpoint, train_fewshot

__all__ = ["RegADBackend", "RegADConfig", "TrainConfig", "check_checkpoint", "train_fewshot"]
