"""PromptAD (Li et al., CVPR 2024), few-shot: prompts learned on the k normal shots plus a visual gallery.

* :mod:`.prompts`: the prompt learner (semantic concatenation), its text features and losses;
* :mod:`.forward`: the images' preprocessing and the dual-path (v-v) image forward;
* :mod:`.backend`: :class:`PromptADBackend`, :class:`PromptADConfig`, the maps and scores;
* :mod:`.train`: training of the prompts on the shots (rule ``train_fewshot``).
"""

from .backend import PromptADBackend, PromptADConfig
from .train import TrainConfig, check_checkpoint, train_fewshot

__all__ = ["PromptADBackend", "PromptADConfig", "TrainConfig", "check_checkpoint", "train_fewshot"]
