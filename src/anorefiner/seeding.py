"""Explicit seeding: every stochastic step takes a seed from the config."""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA); make CPU kernels deterministic."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng(seed: int, *streams: int | str) -> np.random.Generator:
    """An independent NumPy generator for ``seed`` and a named sub-stream (e.g. group index)."""
    words = [int(seed)] + [s if isinstance(s, int) else _stable_hash(s) for s in streams]
    return np.random.default_rng(np.random.SeedSequence(words))


def _stable_hash(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
