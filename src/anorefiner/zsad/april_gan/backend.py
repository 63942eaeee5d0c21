"""APRIL-GAN (VAND 2023 winner), zero-shot mode: trained linear adapters on raw CLIP tokens.

Facts from ``ByChelsea/VAND-APRIL-GAN@f13b8a6`` (specs/backends.md section 1):

* per tapped layer l (6/12/18/24 of ViT-L-14-336 at 518): raw block output, class token dropped,
  ``Linear(1024 -> 768)`` (``model.py`` LinearLayer), L2-normalise -> p_l;
* text T ``[2, 768]``: the per-class prompt ensemble (:mod:`.prompts`, set ``april_gan``);
* logits_l = 100 * p_l @ T^T (``test.py`` l.168-176: the fixed temperature, not CLIP's logit scale);
* map = sum over l of softmax(bilinear_upsample(logits_l, 518, align_corners=True))[abnormal]
  (``test.py`` l.176-183), range [0, 4], no smoothing;
* image score = softmax(100 * g @ T^T)[abnormal], g = L2-normalised ``ln_post(CLS) @ proj``
  (``test.py`` l.161-169; the map maximum is only used in few-shot mode).

Store choice: the coarse store holds token-grid maps (PGT's ARD input). :func:`patch_map` is the
area mean of the official full-resolution map over each patch's pixels (a 14x14 average pool at
518/37), so upsampling it back approximates the official map; :func:`full_map` is the official map
itself. The choice is recorded in the store attrs (``map_level``).

Checkpoints: ``{"trainable_linearlayer": {"fc.{i}.weight": [768,1024], "fc.{i}.bias": [768]}}``,
the official format (``train.py``), loaded with ``weights_only=True``; the pipeline trains them
itself (:mod:`.april_gan_train`, rule ``train_backend``) or uses the official files
(:mod:`.checkpoints`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...log import LOG
from ..maps import float_tensor
from ..maps import resolve_device as _resolve_device

CHECKPOINT_KEY = "trainable_linearlayer"  # train.py's key, kept so the official files load as ours
MAP_LEVEL = "token grid: area mean of the official 518-px map (bilinear logits -> softmax -> sum) per patch"


@dataclass
class AprilGanConfig:
    """Options of the ``april_gan`` backend (config ``backends.<name>.options``)."""

    checkpoint: str = ""  # adapters file; the coarse rule passes the trained or official one
    class_name: str = ""  # prompt class name; the coarse command passes the category verbatim (official)
    prompt_set: str = "april_gan"  # prompt_ensemble.py's 7 normal / 5 abnormal states x 35 templates
    temperature: float = 100.0  # test.py l.168,174: fixed 100
    map_size: int | None = None  # official upsampling size; None = the backbone's input size (518)
    text_cache: str = ""  # folder of the per-class text cache ("" = no cache); the workflow: results/text
    batch_size: int = 16  # images per map computation (bounds memory of the [B,2,518,518] maps)
    device: str = "auto"


class LinearAdapters(torch.nn.Module):
    """``model.py`` LinearLayer: one ``Linear(dim_in, dim_out)`` per tapped layer (default init)."""

    def __init__(self, dim_in: int, dim_out: int, n_layers: int):
        super().__init__()
        self.fc = torch.nn.ModuleList([torch.nn.Linear(dim_in, dim_out) for _ in range(n_layers)])

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[B, L, dim_in]`` per layer -> L2-normalised ``[B, L, dim_out]`` per layer."""
        if len(tokens) != len(self.fc):
            raise ValueError(f"april_gan: {len(tokens)} token layers for {len(self.fc)} adapters")
        return [F.normalize(fc(t), dim=-1) for fc, t in zip(self.fc, tokens)]


def layer_logits(p: torch.Tensor, text: torch.Tensor, grid: tuple[int, int], temperature: float) -> torch.Tensor:
    """``[B, L, D]`` normalised tokens, text ``[2, D]`` or per-sample ``[B, 2, D]`` -> ``[B, 2, h, w]``."""
    t = text if text.ndim == 3 else text.unsqueeze(0).expand(p.shape[0], -1, -1)
    logits = temperature * torch.bmm(p, t.transpose(1, 2).to(p.dtype))
    return logits.transpose(1, 2).reshape(p.shape[0], 2, grid[0], grid[1])


def layer_probs(logits: torch.Tensor, size: int) -> torch.Tensor:
    """``test.py`` l.176-181: bilinear upsample (align_corners=True), softmax over the 2 classes."""
    up = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True)
    return torch.softmax(up, dim=1)


def full_map(logits: list[torch.Tensor], size: int) -> torch.Tensor:
    """The official map ``[B, size, size]``: sum over layers of the abnormal probability."""
    return sum(layer_probs(lg, size)[:, 1] for lg in logits)


def patch_map(full: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area mean of ``[B, S, S]`` over the ``grid`` cells (adaptive average pool) -> ``[B, h, w]``."""
    return F.adaptive_avg_pool2d(full.unsqueeze(1), grid).squeeze(1)


def image_scores(global_emb: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(100 * g @ T^T)[abnormal]`` with ``g`` and ``T`` L2-normalised."""
    g = F.normalize(global_emb.float(), dim=-1)
    return torch.softmax(temperature * g @ F.normalize(text.float(), dim=-1).T, dim=-1)[:, 1]


def load_adapters(path: str | Path, n_layers: int | None = None, dim_in: int | None = None,
                  what: str = "april_gan") -> LinearAdapters:
    """Adapters of a checkpoint (ours or the official ``exps/pretrained/*.pth``), keys and shapes checked;
    ``what`` names the backend in the errors (RareCLIP's text adapters share the format)."""
    from ..checkpoints import load_weights_only

    path = Path(path)
    obj = load_weights_only(path, f"{what} checkpoint")
    state = obj.get(CHECKPOINT_KEY) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{what} checkpoint {path}: no {CHECKPOINT_KEY!r} state dict "
                         f"(top-level keys: {sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__})")
    n = len([k for k in state if k.endswith(".weight")])
    expected = {f"fc.{i}.{p}" for i in range(n) for p in ("weight", "bias")}
    if n == 0 or set(state) != expected:
        raise ValueError(f"{what} checkpoint {path}: keys {sorted(state)} are not fc.{{0..{n - 1}}}.weight/bias")
    w0 = state["fc.0.weight"]
    out_dim, in_dim = w0.shape
    for i in range(n):
        w, b = state[f"fc.{i}.weight"], state[f"fc.{i}.bias"]
        if tuple(w.shape) != (out_dim, in_dim) or tuple(b.shape) != (out_dim,):
            raise ValueError(f"{what} checkpoint {path}: fc.{i} has shapes {tuple(w.shape)}/{tuple(b.shape)}, "
                             f"expected {(out_dim, in_dim)}/{(out_dim,)}")
    if n_layers is not None and n != n_layers:
        raise ValueError(f"{what} checkpoint {path}: {n} adapters but the feature cache has {n_layers} layers")
    if dim_in is not None and in_dim != dim_in:
        raise ValueError(f"{what} checkpoint {path}: adapters take {in_dim}-d tokens, the backbone gives {dim_in}")
    adapters = LinearAdapters(in_dim, out_dim, n)
    adapters.load_state_dict({k: v.float() for k, v in state.items()})
    return adapters.eval().requires_grad_(False)


class AprilGanBackend:
    """APRIL-GAN zero-shot maps and scores as a :class:`~anorefiner.zsad.Backend`."""

    def __init__(self, config: AprilGanConfig | None = None, backbone=None, name: str = "april_gan", seed: int = 0):
        self.config = config or AprilGanConfig()
        self.backbone, self.name, self.seed = backbone, name, int(seed)
        c = self.config
        if backbone is None or not hasattr(backbone, "image_embedding"):
            raise ValueError("april_gan needs the CLIP backbone (text tower and image embedding): pass --backbone")
        if not c.checkpoint:
            raise ValueError("april_gan needs option 'checkpoint' (trained adapters: rule train_backend, "
                             "or the official files, backends.<name>.weights: official)")
        self.device = _resolve_device(c.device)
        self.adapters = load_adapters(c.checkpoint, len(backbone.layers), getattr(backbone, "width", None))
        self.adapters.to(self.device)
        from ..prompts import text_embeddings

        self.text = text_embeddings(backbone, c.class_name, c.prompt_set, c.text_cache or None).to(self.device)
        self.map_size = int(c.map_size or backbone.resolution)
        self.last_info = {"map_level": MAP_LEVEL, "map_size": self.map_size, "checkpoint": str(c.checkpoint)}

    def _maps(self, layers: dict) -> torch.Tensor:
        """Token-grid maps ``[N, h, w]`` of raw tokens ``{layer: [N, h, w, C]}`` (the backbone's layers)."""
        names = list(self.backbone.layers)
        missing = [n for n in names if n not in layers]
        if missing:
            raise ValueError(f"april_gan: layers {missing} not in the features (have {list(layers)})")
        n, h, w, _ = layers[names[0]].shape
        bs = self.config.batch_size
        out = []
        for a in range(0, n, bs):
            toks = [float_tensor(layers[k][a : a + bs]).reshape(-1, h * w, layers[k].shape[-1]).to(self.device)
                    for k in names]
            with torch.no_grad():
                logits = [layer_logits(p, self.text, (h, w), self.config.temperature) for p in self.adapters(toks)]
                out.append(patch_map(full_map(logits, self.map_size), (h, w)).cpu())
        return torch.cat(out, 0)

    def coarse(self, feats):
        from .. import CoarseResult

        if feats.cls is None:
            raise ValueError("april_gan: the feature cache has no class token (a CLIP ViT cache is needed)")
        maps = self._maps(feats.layers)
        with torch.no_grad():
            g = self.backbone.image_embedding(torch.as_tensor(np.asarray(feats.cls)).float(), normalize=True)
            scores = image_scores(torch.as_tensor(g).to(self.device), self.text, self.config.temperature)
        LOG.info("april_gan: %d maps %s (%s)", len(maps), tuple(maps.shape[1:]), MAP_LEVEL)
        return CoarseResult(maps=maps.numpy().astype(np.float32), scores=scores.cpu().numpy().astype(np.float32))

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude):
        """Per-image method: the references play no role (PGT's pseudo-anomalies get their own maps)."""
        return self._maps(query_layers)
