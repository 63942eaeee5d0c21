"""Bring your own maps: anomaly maps of any zero-shot method read from a file (docs/byo.md)."""

from .backend import ByoBackend, ByoConfig, load_byo

__all__ = ["ByoBackend", "ByoConfig", "load_byo"]
