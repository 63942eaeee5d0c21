"""WinCLIP (Jeong et al., CVPR 2023), training-free window-level CLIP scoring, zero- and few-shot."""

from .backend import WinClipBackend, WinClipConfig

__all__ = ["WinClipBackend", "WinClipConfig"]
