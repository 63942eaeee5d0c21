"""CNN backbones: the offline EfficientNet-Lite0 weights are mapped right; stage outputs and shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anorefiner.backbones import build_backbone
from anorefiner.backbones.cnn import load_efficientnet_lite0_weights, packaged_efficientnet_lite0_file


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", 224)


def test_efficientnet_lite0_classifies_chelsea_as_egyptian_cat(lite0):
    from skimage import data

    with torch.no_grad():
        probs = lite0.model(lite0.preprocess([data.chelsea()])).softmax(-1)[0]
    assert int(probs.argmax()) == 285  # ImageNet "Egyptian cat"
    assert float(probs[285]) > 0.5


def test_efficientnet_lite0_preprocessing_and_identity(lite0):
    ident = lite0.identity
    assert ident["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert ident["preprocess"]["std"] == [0.5, 0.5, 0.5]
    assert ident["preprocess"]["interpolation"] == "bicubic"
    assert ident["weights"].endswith("sha256:579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db")
    assert ident["layers"] == ["blocks.2", "blocks.4"]
    assert set(ident["versions"]) >= {"torch", "timm", "open_clip_torch"}


def test_efficientnet_lite0_layers_share_the_stride8_grid(lite0):
    x = lite0.preprocess([torch.zeros(50, 70, 3, dtype=torch.uint8).numpy()] * 2)
    assert x.shape == (2, 3, 224, 224)
    layers, cls = lite0.forward(x)
    assert cls is None
    assert list(layers) == ["blocks.2", "blocks.4"]
    assert layers["blocks.2"].shape == (2, 28, 28, 40)
    assert layers["blocks.4"].shape == (2, 28, 28, 112)
    assert lite0.grid == (28, 28) and lite0.patch_stride == 8


def test_weight_mapping_fails_loudly_on_a_shape_mismatch(tmp_path):
    state = torch.load(packaged_efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    key = "_blocks.3._project_conv.weight"
    state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    model = build_backbone("efficientnet_lite0", 64, pretrained=None).model
    with pytest.raises(ValueError, match=r"_blocks\.3\._project_conv\.weight"):
        load_efficientnet_lite0_weights(model, str(bad))


def test_resnet50_layer2_layer3_resized_to_layer2_grid():
    bb = build_backbone("resnet50", 64, pretrained=None, seed=3)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    layers, cls = bb.forward(x)
    assert cls is None and list(layers) == ["layer2", "layer3"]
    m = bb.model
    with torch.no_grad():
        l2 = m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))
        l3 = m.layer3(l2)
    assert layers["layer2"].shape == (2, 8, 8, 512)
    assert layers["layer3"].shape == (2, 8, 8, 1024)
    torch.testing.assert_close(layers["layer2"], l2.permute(0, 2, 3, 1))
    up = F.interpolate(l3, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(layers["layer3"], up.permute(0, 2, 3, 1))
    assert bb.identity["preprocess"]["mean"] == [0.485, 0.456, 0.406]


def test_resnet18_is_torchvisions_with_its_own_weights_enum(tmp_path):
    """RegAD's network starts from a ResNet-18: the same builder, torchvision's resnet18 stages."""
    bb = build_backbone("resnet18", 64, layers=["layer1"], pretrained=None, seed=3)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    layers, _ = bb.forward(x)
    m = bb.model
    with torch.no_grad():
        l1 = m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))
    assert bb.name == "resnet18" and layers["layer1"].shape == (1, 16, 16, 64) and bb.grid == (16, 16)
    torch.testing.assert_close(layers["layer1"], l1.permute(0, 2, 3, 1))
    path = tmp_path / "w.pt"
    torch.save(m.state_dict(), path)
    again = build_backbone("resnet18", 64, layers=["layer1"], pretrained=str(path))
    torch.testing.assert_close(again.forward(x)[0]["layer1"], layers["layer1"])
    with pytest.raises(ValueError, match="not a ResNet18_Weights member"):
        build_backbone("resnet18", 64, pretrained="IMAGENET_BOGUS")


def test_local_weights_file_with_timm_names_loads_and_is_hashed(tmp_path):
    bb = build_backbone("efficientnet_lite0", 32, pretrained=None, seed=5)
    path = tmp_path / "lite0.pt"
    torch.save(bb.model.state_dict(), path)
    again = build_backbone("efficientnet_lite0", 32, pretrained=str(path))
    assert again.identity["weights"].startswith("lite0.pt sha256:")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.forward(x)[0]["blocks.4"], bb.forward(x)[0]["blocks.4"])


def test_random_weights_follow_the_seed():
    a = build_backbone("efficientnet_lite0", 32, pretrained=None, seed=1).model.conv_stem.weight
    b = build_backbone("efficientnet_lite0", 32, pretrained=None, seed=1).model.conv_stem.weight
    c = build_backbone("efficientnet_lite0", 32, pretrained=None, seed=2).model.conv_stem.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_requests_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="layer9"):
        build_backbone("resnet50", 64, layers=["layer9"], pretrained=None)
    with pytest.raises(ValueError, match="IMAGENET_BOGUS"):
        build_backbone("resnet50", 64, pretrained="IMAGENET_BOGUS")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("efficientnet_lite0", 64, pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="no-such-net"):
        build_backbone("no-such-net", 64)
    cnn = build_backbone("efficientnet_lite0", 32, pretrained=None)
    with pytest.raises(TypeError, match="text encoder"):
        cnn.encode_text(["a photo"])
    with pytest.raises(TypeError, match="image-text"):
        cnn.image_embedding(torch.zeros(1, 8))
