"""PA-CLIP's PAD and PAM on another CLIP backend (PA-CLIP Tables 5-6, "AdaCLIP/AnomalyCLIP +PAD+PAM")."""

from .backend import PadPamBackend, PadPamConfig

__all__ = ["PadPamBackend", "PadPamConfig"]
