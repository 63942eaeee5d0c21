"""open_clip Vision Transformers: raw residual-stream patch tokens of 1-indexed blocks.

Paper supplement A and specs/methods.md (MuSc): ViT-L-14-336 with OpenAI weights, 518×518 input
(37×37 patches, position embeddings interpolated), layers 6/12/18/24 counted from 1, patch tokens
taken straight from the residual stream (no ``ln_post``, no projection). The class token of the
last block is kept separately: ``ln_post`` + ``proj`` of it is CLIP's image embedding, which
PA-CLIP compares with text embeddings (:meth:`ClipViT.encode_text`).

Activation (``activation="gelu"`` by default): OpenAI's weights were trained with QuickGELU, but
the official MuSc, APRIL-GAN and RareCLIP code (vendored open_clip ``factory.py`` create_model,
``pretrained == 'openai'`` branch, rebuilding ``CLIP(**model_cfg)`` from ``ViT-L-14-336.json`` when
the image size is not 336) and VCP-CLIP (``models/transformer.py`` l.498-499) all run them with
plain ``nn.GELU`` at 518 px, so every published number of these methods comes from GELU features
(specs/methods.md, last section; specs/backends.md section 0.2). ``"quick_gelu"`` is the named
alternative. The activation is part of :attr:`ClipViT.identity`, hence of every feature cache's
attributes, and readers check it.

Position-embedding resize (``pos_embed``, :func:`interpolate_pos_embed`): the official forks differ in how
they resize the 24×24 grid to 37×37. Antialiased bicubic (the default) is APRIL-GAN's, VCP-CLIP's and
RareCLIP's; MuSc's vendored open_clip drops the antialias argument, so MuSc's features need
``"bicubic_no_antialias"`` (a backbone entry of its own in config/config.yaml, docs/fidelity.md). Like the
activation it is part of :attr:`ClipViT.identity` and of the feature cache's attributes, which readers check.

:func:`register_tiny_clip` registers ``anorefiner-tiny-clip`` (width-64 ViT, 4 blocks, patch 14,
a 2-block width-32 text tower), a random-weights model for tests and CPU smoke runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .._compat import import_open_clip
from . import DEFAULT, Backbone, is_local_weights, random_init, sha256_file

# OpenAI CLIP's normalisation (open_clip.constants); used when a model carries no preprocess cfg.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

#: Transformer MLP activations a :class:`ClipViT` can run with (see the module docstring).
ACTIVATIONS = ("gelu", "quick_gelu")
#: The official code's activation at 518 px (specs/methods.md, "CLIP activation at 518 px").
DEFAULT_ACTIVATION = "gelu"

TINY_CLIP = "anorefiner-tiny-clip"
_CONFIG_DIR = Path(__file__).with_name("model_configs")


def register_tiny_clip() -> str:
    """Register the project's open_clip model configs (idempotent) and return the tiny model's name.

    ``anorefiner-tiny-clip`` has no pretrained weights: build it with ``pretrained=None``.
    """
    open_clip = import_open_clip()
    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)
    return TINY_CLIP


#: Position-embedding resize modes of :func:`interpolate_pos_embed` (which official code uses which: its docstring).
POS_EMBED_RESIZE = ("bicubic", "bicubic_no_antialias", "bilinear")
#: The backbone's own resize (``backbones.<key>.pos_embed`` unset): APRIL-GAN's, VCP-CLIP's and RareCLIP's open_clip.
DEFAULT_POS_EMBED = "bicubic"


def interpolate_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                          mode: str = "bicubic") -> torch.Tensor:
    """Resize a ``[1 + gh*gw, C]`` position embedding to a new patch grid.

    The patch part is treated as a 2-D ``gh×gw`` image and resized (``align_corners=False``); the class
    position (row 0) is kept unchanged. ``mode``:

    * ``"bicubic"`` (default): bicubic with ``antialias=True``, as open_clip's ``resize_pos_embed`` and the
      official APRIL-GAN/VCP-CLIP forks (backends.md section 0.3); PyTorch's antialiased bicubic uses another
      kernel, so it differs from plain bicubic even when upsampling;
    * ``"bicubic_no_antialias"``: plain bicubic (cubic convolution, a = -0.75, borders replicated), AdaCLIP's
      own ``resize_pos_embed`` (``caoyunkang/AdaCLIP@e27ee32`` ``method/clip_model.py`` l.382-412, called by
      ``method/custom_clip.py`` ``create_model``) and MuSc's: its vendored open_clip's ``resize_pos_embed``
      (``xrli-U/MuSc@b76b93d`` ``models/backbone/open_clip/model.py`` l.413-441) takes ``antialias=True`` but
      calls ``F.interpolate(mode='bicubic', align_corners=False)`` without it (torch's default: no antialias),
      on the fp32 state dict (``openai.py`` l.86-87 ``model.float()``, ``factory.py`` l.168);
    * ``"bilinear"``: plain bilinear, no antialias (AnomalyCLIP's own resize, ``AnomalyCLIP.py`` L363-370).
    """
    if mode not in POS_EMBED_RESIZE:
        raise ValueError(f"position embedding resize mode must be one of {POS_EMBED_RESIZE}, got {mode!r}")
    n_expected = 1 + old_grid[0] * old_grid[1]
    if pos.ndim != 2 or pos.shape[0] != n_expected:
        raise ValueError(f"position embedding of shape {tuple(pos.shape)} does not fit grid {old_grid} + class")
    if tuple(old_grid) == tuple(new_grid):
        return pos
    cls_pos, grid = pos[:1], pos[1:]
    c = grid.shape[1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2)
    grid = grid.float() if grid.dtype in (torch.float16, torch.bfloat16) else grid  # float64 stays float64
    interp = "bilinear" if mode == "bilinear" else "bicubic"
    grid = F.interpolate(grid, size=tuple(new_grid), mode=interp, align_corners=False, antialias=mode == "bicubic")
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], c).to(pos.dtype)
    return torch.cat([cls_pos, grid], dim=0)


def pos_embed_mode(identity_value) -> str | None:
    """The resize mode recorded in a backbone identity's (or a feature cache's) ``pos_embed`` text
    (:attr:`ClipViT.identity`), or None when there is none (CNNs, caches from before it was recorded)."""
    if not isinstance(identity_value, str) or not identity_value:
        return None
    if identity_value.startswith("bicubic antialias"):
        return DEFAULT_POS_EMBED
    first = identity_value.split()[0]
    return first if first in POS_EMBED_RESIZE else None


def with_pos_embed(backbone, mode: str):
    """``backbone`` with its position embedding resized by ``mode`` (:data:`POS_EMBED_RESIZE`): a shallow copy
    sharing the frozen model, or ``backbone`` itself when ``mode`` is its own (``backbone.pos_embed_mode``)."""
    import copy

    if mode not in POS_EMBED_RESIZE:
        raise ValueError(f"position embedding resize mode must be one of {POS_EMBED_RESIZE}, got {mode!r}")
    if mode == getattr(backbone, "pos_embed_mode", "bicubic"):
        return backbone
    out = copy.copy(backbone)
    with torch.no_grad():
        pos = interpolate_pos_embed(backbone.visual.positional_embedding.detach(), tuple(backbone.native_grid),
                                    tuple(backbone.grid), mode=mode)
    out.pos_embed = pos.to(backbone.pos_embed.device)
    out.pos_embed_mode = mode
    return out


def default_vit_layers(n_blocks: int) -> list[int]:
    """The quarters of the depth: 6/12/18/24 for 24 blocks (the paper's layers), 3/6/9/12 for 12."""
    return sorted({max(1, round(n_blocks * q / 4)) for q in (1, 2, 3, 4)})


class ClipViT(Backbone):
    """An open_clip ``VisionTransformer`` run block by block at any multiple of its patch size."""

    def __init__(
        self,
        name: str,
        resolution: int,
        layers: Sequence[int | str] | None = None,
        pretrained: str | os.PathLike | None = DEFAULT,
        device: torch.device = torch.device("cpu"),
        seed: int = 0,
        activation: str = DEFAULT_ACTIVATION,
        pos_embed: str = DEFAULT_POS_EMBED,
    ):
        open_clip = import_open_clip()
        register_tiny_clip()
        self._open_clip = open_clip
        self._tokenizer = None
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
        if pos_embed not in POS_EMBED_RESIZE:
            raise ValueError(f"position embedding resize {pos_embed!r} is not one of {POS_EMBED_RESIZE}")
        if name not in open_clip.list_models():
            raise ValueError(
                f"unknown backbone {name!r}: not 'resnet50'/'efficientnet_lite0' and not an open_clip model "
                f"(e.g. ViT-L-14-336, ViT-B-16; see open_clip.list_models())"
            )
        self.name, self.resolution, self.device = name, resolution, device
        tags = open_clip.list_pretrained_tags_by_model(name)
        ref_tag = "openai" if "openai" in tags else None
        if pretrained is None:
            tag, path = None, None
            self.weights = f"random(seed={seed})"
        elif is_local_weights(pretrained):
            tag, path = None, str(pretrained)
            self.weights = f"sha256:{sha256_file(path)}"
        else:
            tag = ref_tag if pretrained == DEFAULT else str(pretrained)
            if tag is None or tag not in tags:
                raise ValueError(
                    f"pretrained {pretrained!r} is not an open_clip tag of {name!r}; available: {tags}"
                )
            path = None
            self.weights = tag
        # Not the tag's own setting (QuickGELU for OpenAI weights): see the module docstring.
        self.activation = activation
        self.quick_gelu = activation == "quick_gelu"
        with random_init(seed):
            model = open_clip.create_model(
                name,
                pretrained=tag or path,
                force_quick_gelu=self.quick_gelu,
                device="cpu",
                weights_only=True,
            )
        _check_activation(model, activation, name)
        model.eval().requires_grad_(False)
        self.model = model.to(device)
        visual = self.model.visual
        if not hasattr(visual, "transformer") or not hasattr(visual.transformer, "resblocks"):
            raise ValueError(f"open_clip model {name!r} has no VisionTransformer with resblocks (timm tower?)")
        self.visual = visual

        ph, pw = visual.patch_size
        if ph != pw:
            raise ValueError(f"{name}: non-square patches {visual.patch_size} are not supported")
        self.patch_stride = int(ph)
        if resolution % self.patch_stride:
            raise ValueError(f"resolution {resolution} is not a multiple of {name}'s patch size {self.patch_stride}")
        n_blocks = len(self.blocks)
        chosen = default_vit_layers(n_blocks) if layers is None else [_block_number(v, n_blocks, name) for v in layers]
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"layers {list(layers)} repeat a block")
        self._layer_ids = chosen
        self.layers = [str(i) for i in chosen]

        pcfg = getattr(visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(pcfg.get("mean", OPENAI_MEAN))
        self.std = tuple(pcfg.get("std", OPENAI_STD))
        self.interpolation = str(pcfg.get("interpolation", "bicubic"))
        self.native_grid = tuple(int(g) for g in visual.grid_size)
        g = resolution // self.patch_stride
        with torch.no_grad():
            self.pos_embed = interpolate_pos_embed(visual.positional_embedding.detach(), self.native_grid, (g, g),
                                                   mode=pos_embed)
        self.pos_embed_mode = pos_embed  # with_pos_embed gives a copy resized otherwise
        self.width = int(visual.class_embedding.shape[0])

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return self.visual.transformer.resblocks

    @property
    def batch_first(self) -> bool:
        """open_clip 3.x runs blocks on (N, L, D); older releases and ``batch_first=False`` on (L, N, D)."""
        return bool(getattr(self.visual.transformer, "batch_first", True))

    # ------------------------------------------------------------------ features
    def forward(self, batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Patch tokens ``[N,h,w,width]`` of the chosen blocks and the last block's class token ``[N,width]``.

        Mirrors ``VisionTransformer._embeds`` + ``Transformer.forward`` with the interpolated
        position embedding; every block runs (the class token comes from the last one).
        """
        v = self.visual
        r = self.resolution
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, r, r):
            raise ValueError(f"{self.name}: expected a [N,3,{r},{r}] batch, got {tuple(batch.shape)}")
        wanted = set(self._layer_ids)
        out: dict[str, torch.Tensor] = {}
        x = self.embed(batch)
        n, c = x.shape[0], x.shape[2]
        gh, gw = self.grid
        with torch.no_grad():
            x = v.patch_dropout(x)  # identity in eval mode
            x = v.ln_pre(x)
            if not self.batch_first:
                x = x.transpose(0, 1)  # open_clip's sequence-first layout (L, N, D)
            for i, block in enumerate(self.blocks, start=1):
                x = block(x)
                if i in wanted:
                    nld = x if self.batch_first else x.transpose(0, 1)
                    out[str(i)] = nld[:, 1:].reshape(n, gh, gw, c)
            last = x if self.batch_first else x.transpose(0, 1)
            cls_token = last[:, 0]
        return {name: out[name] for name in self.layers}, cls_token

    # ------------------------------------------------------------------ token sequences (WinCLIP windows)
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """``[N,3,R,R]`` -> ``[N, 1+h*w, width]``: class token + patch embeddings + position embedding,
        the sequence before ``patch_dropout``/``ln_pre`` (where WinCLIP selects its windows)."""
        v = self.visual
        r = self.resolution
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, r, r):
            raise ValueError(f"{self.name}: expected a [N,3,{r},{r}] batch, got {tuple(batch.shape)}")
        with torch.no_grad():
            x = v.conv1(batch.to(self.device, dtype=v.conv1.weight.dtype))
            n, c = x.shape[:2]
            x = x.flatten(2).transpose(1, 2)
            cls = v.class_embedding.to(x.dtype).reshape(1, 1, c).expand(n, 1, c)
            return torch.cat([cls, x], dim=1) + self.pos_embed.to(x.device, x.dtype)

    def encode_sequences(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded sequences ``[M, L, width]`` (class token first, any L) -> ``ln_post(CLS) @ proj``
        ``[M, D]``: the rest of CLIP's image forward on a subset of tokens (not normalised)."""
        v = self.visual
        with torch.no_grad():
            x = v.ln_pre(v.patch_dropout(x))
            x = v.transformer(x if self.batch_first else x.transpose(0, 1))
            cls = (x if self.batch_first else x.transpose(0, 1))[:, 0]
        return self.image_embedding(cls, normalize=False)

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """``ln_post`` of raw last-block patch tokens: open_clip's ``output_tokens`` (WinCLIP few-shot)."""
        with torch.no_grad():
            return self.visual.ln_post(torch.as_tensor(tokens).to(self.device, self.visual.proj.dtype))

    # ------------------------------------------------------------------ image-text space
    def image_embedding(self, cls: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``ln_post(cls) @ proj``: CLIP's image embedding from the last block's class token."""
        v = self.visual
        if v.attn_pool is not None or v.pool_type != "tok":
            raise TypeError(f"{self.name}: image embedding needs class-token pooling (pool_type 'tok')")
        cls = torch.as_tensor(cls, dtype=v.proj.dtype if v.proj is not None else torch.float32)
        with torch.no_grad():
            emb = v.ln_post(cls.to(self.device))
            if v.proj is not None:
                emb = emb @ v.proj
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """CLIP text embeddings ``[T,D]``, L2-normalised unless ``normalize=False`` (open_clip's tokenizer)."""
        if isinstance(texts, str) or not texts:
            raise ValueError("encode_text takes a non-empty list of strings")
        if self._tokenizer is None:
            self._tokenizer = self._open_clip.get_tokenizer(self.name)
        tokens = self._tokenizer(list(texts)).to(self.device)
        with torch.no_grad():
            return self.model.encode_text(tokens, normalize=normalize).float()

    @property
    def identity(self) -> dict:
        ident = super().identity
        ident["family"] = "open_clip"
        ident["activation"] = self.activation
        ident["tokens"] = "raw residual stream of 1-indexed blocks (no ln_post/proj); cls of last block"
        how = "bicubic antialias" if self.pos_embed_mode == "bicubic" else self.pos_embed_mode
        ident["pos_embed"] = f"{how} {self.native_grid}->{self.grid}, class position kept"
        return ident


def _check_activation(model: torch.nn.Module, activation: str, name: str) -> None:
    """The vision tower's MLPs really use ``activation`` (a ``-quickgelu`` config cannot run GELU)."""
    blocks = getattr(getattr(model.visual, "transformer", None), "resblocks", None)
    if not blocks:
        return
    act = type(blocks[0].mlp.gelu).__name__
    got = "quick_gelu" if act == "QuickGELU" else "gelu" if act == "GELU" else act
    if got != activation:
        raise ValueError(
            f"{name}: requested activation {activation!r} but the model config builds {act}; "
            f"use the matching open_clip name (with or without '-quickgelu') or activation {got!r}"
        )


def _block_number(value, n_blocks: int, name: str) -> int:
    try:
        i = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: layer {value!r} is not a block number (1..{n_blocks})") from None
    if not 1 <= i <= n_blocks:
        raise ValueError(f"{name}: layer {value!r} is out of range: blocks are numbered 1..{n_blocks}")
    return i
