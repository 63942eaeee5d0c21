"""Shared fixtures: a small seeded MVTec-layout dataset, and offline settings for every test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub: open_clip/huggingface must fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANOREFINER_NO_PROGRESS", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BOTTLE = SHARED / "data" / "mvtec_ad" / "bottle"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    """A small seeded MVTec-layout dataset (2 categories, 64 px, 6 train / 12 test images each).

    Returns the dataset root; categories are ``sorted(p.name for p in root.iterdir() if p.is_dir())``.
    """
    from anorefiner.data.demo import generate_demo

    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, categories=("tiles", "widget"), image_size=64, n_train=6, n_test=12, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_clip() -> str:
    """Name of the tiny random open_clip model (width-64 ViT, 4 blocks, patch 14, 32-d text tower).

    Build it with ``build_backbone(tiny_clip, R, pretrained=None, seed=...)``, R a multiple of 14.
    """
    from anorefiner.backbones.clip_vit import register_tiny_clip

    return register_tiny_clip()


@pytest.fixture(scope="session")
def bottle_root() -> Path:
    """The real MVTec AD bottle category's parent folder (skips when ../shared is absent)."""
    if not BOTTLE.is_dir():
        pytest.skip("../shared/data/mvtec_ad/bottle is not present")
    return BOTTLE.parent
