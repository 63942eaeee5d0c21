"""AnomalyCLIP (ICLR 2024): object-agnostic learned prompts on a dual-path (DPAM) CLIP image tower.

* :mod:`.backend`: :class:`AnomalyCLIPBackend`, :class:`AnomalyCLIPConfig` and the prompt learner;
* :mod:`.dpam`: the dual-path visual forward;
* :mod:`.train`: training on the auxiliary dataset (rule ``train_backend``).
"""

from .backend import AnomalyCLIPBackend, AnomalyCLIPConfig, PromptLearner, load_prompt_learner
from .train import TrainConfig, check_checkpoint, train_backend

__all__ = ["AnomalyCLIPBackend", "AnomalyCLIPConfig", "PromptLearner", "TrainConfig", "check_checkpoint",
           "load_prompt_learner", "train_backend"]
