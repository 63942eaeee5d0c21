"""VCP-CLIP (ECCV 2024): image-conditioned text prompts with a raw and a Post-VCP branch.

* :mod:`.backend`: :class:`VcpClipBackend`, :class:`VcpClipConfig`, Post-VCP and the checkpoint;
* :mod:`.prompts`: the text side (class slot, Pre-VCP, deep text prompts);
* :mod:`.train`: training on the auxiliary dataset (rule ``train_backend``).
"""

from .backend import VcpClipBackend, VcpClipConfig, load_vcp_checkpoint
from .train import TrainConfig, check_checkpoint, train_backend

__all__ = ["TrainConfig", "VcpClipBackend", "VcpClipConfig", "check_checkpoint", "load_vcp_checkpoint",
           "train_backend"]
