"""Fixtures of the stream tests: the demo dataset's 'tiles' test images in index order, a random tiny backbone."""

import pytest


@pytest.fixture(scope="package")
def tiles(demo_dataset):
    """Paths of the 12 test images, EfficientNet-Lite0 at 64 px with random weights, MuSc without RsCIN."""
    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import index_category
    from anorefiner.zsad import get_backend

    df = index_category(demo_dataset, "tiles", dataset="demo", split="test")
    backbone = build_backbone("efficientnet_lite0", 64, pretrained=None, seed=0)
    backend = get_backend("musc", {"rscin": False, "device": "cpu"})
    return dict(paths=[str(p) for p in df.image_path], backbone=backbone, backend=backend)
