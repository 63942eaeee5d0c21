"""MVFA-AD (Huang et al., CVPR 2024), few-shot: residual adapters inside CLIP's image tower and a memory of the
shots' adapted tokens.

Facts from ``MediaBrain-SJTU/MVFA-AD@a30bf7b`` (docs/backends.md "MVFA-AD"):

* backbone ViT-L-14-336 (OpenAI weights, GELU: ``CLIP/clip.py`` create_model rebuilds it from
  ``model_configs/ViT-L-14-336.json`` at ``--img_size 240``); images resized to 240 (bicubic) and only scaled
  to [0, 1], *not* CLIP-normalised (``dataset/medical_few.py`` l.36-39); the stride-14 patch embedding sees a
  17 x 17 grid, i.e. the top-left 238 x 238 pixels, so the backbone runs at 238 here on the top-left crop of the
  240-px image (:func:`preprocess`), which is the same computation;
* after blocks 6, 12, 18 and 24 (``--features_list``) two residual adapters (``CLIP/adapter.py``: ``Linear(1024,
  768, bias=False) + LeakyReLU`` then ``Linear(768, 1024, bias=False) + LeakyReLU``) read the residual stream
  (class token included) and change it: ``x = 0.8 x + 0.1 seg_out + 0.1 det_out`` (l.67-74); their 768-d
  bottleneck outputs are the layer's segmentation and detection tokens;
* text: APRIL-GAN's prompt ensemble (``utils.py`` encode_text_with_prompt_ensemble: the same 7 + 5 states and 35
  templates, normalised mean);
* segmentation maps (``train_few.py`` test l.213-239, the datasets with masks): zero-shot map = sum over layers
  of ``softmax(bilinear_240(100 p @ T))[abnormal]`` (``align_corners=True``) of the L2-normalised seg tokens;
  few-shot map = sum over layers of ``bilinear_240(min_m (1 - cos(memory_m, p)))``, the memory being every
  token (class tokens included, l.174) of the augmented shots; each map min-max normalised over the whole
  category, then ``0.5 zero + 0.5 few`` (l.281-284); image score = the map's maximum (l.288-289). No smoothing.

Store: token-grid maps, the area mean of the 240-px map over each patch (``backend_info.map_level``); the image
score is the maximum of the 240-px map.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...log import LOG, progress
from ..april_gan.backend import patch_map
from ..maps import minmax
from ..maps import resolve_device as _resolve_device

MAP_LEVEL = "token grid: area mean of the official 240-px map (0.5 minmax(zero) + 0.5 minmax(few)) per patch"


@dataclass
class MvfaConfig:
    """Options of the ``mvfa_ad`` backend (config ``backends.<name>.options``)."""

    k_shot: int = 4  # the row's shots (train/good images drawn by the run seed; MVFA-AD --shot 4)
    checkpoint: str = ""  # the adapters trained on the shots (rule train_fewshot)
    class_name: str = ""  # prompt class name; the coarse command passes the category verbatim
    prompt_set: str = "april_gan"  # utils.py encode_text_with_prompt_ensemble: APRIL-GAN's states and templates
    text_cache: str = ""
    temperature: float = 100.0  # train_few.py l.127, 231: 100 x p @ T
    batch_size: int = 8
    device: str = "auto"


class ClipAdapter(torch.nn.Module):
    """``CLIP/adapter.py`` ClipAdapter: bottleneck and output, both LeakyReLU, no biases."""

    def __init__(self, c_in: int, bottleneck: int):
        super().__init__()
        self.fc1 = torch.nn.Sequential(torch.nn.Linear(c_in, bottleneck, bias=False), torch.nn.LeakyReLU())
        self.fc2 = torch.nn.Sequential(torch.nn.Linear(bottleneck, c_in, bias=False), torch.nn.LeakyReLU())

    def forward(self, x):
        mid = self.fc1(x)
        return mid, self.fc2(mid)


class MvfaAdapters(torch.nn.Module):
    """``CLIP_Inplanted``'s adapters (state dict keys ``seg_adapters.*`` / ``det_adapters.*`` as the official)."""

    def __init__(self, c_in: int, bottleneck: int, features: list[int], mix=(0.8, 0.1, 0.1)):
        super().__init__()
        self.features, self.mix = [int(f) for f in features], tuple(float(m) for m in mix)
        self.seg_adapters = torch.nn.ModuleList([ClipAdapter(c_in, bottleneck) for _ in self.features])
        self.det_adapters = torch.nn.ModuleList([ClipAdapter(c_in, bottleneck) for _ in self.features])

    def forward(self, backbone, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Preprocessed images -> (seg tokens, det tokens) per adapted layer, ``[N, 1 + L, bottleneck]`` each."""
        from ...backbones.clip_prompting import visual_forward

        seg, det = [], []
        keep, a, b = self.mix

        def adapt(i: int, y: torch.Tensor) -> torch.Tensor:
            j = self.features.index(i)
            s_mid, s_out = self.seg_adapters[j](y)
            d_mid, d_out = self.det_adapters[j](y)
            seg.append(s_mid)
            det.append(d_mid)
            return keep * y + a * s_out + b * d_out

        hook = lambda i, y: adapt(i - 1, y) if i - 1 in self.features else y  # noqa: E731 (after block i - 1)
        _, last = visual_forward(backbone, x, before_block=hook)
        if len(backbone.blocks) in self.features:
            adapt(len(backbone.blocks), last)
        return seg, det


def build_adapters(backbone, text_dim: int, features, bottleneck: int | None = None, mix=(0.8, 0.1, 0.1),
                   seed: int = 111) -> MvfaAdapters:
    """Adapters after the 1-based ``features`` blocks, width ``bottleneck`` (None: the text width, 768 for
    ViT-L/14), default initialisation drawn from ``seed``."""
    bad = [f for f in features if not 1 <= int(f) <= len(backbone.blocks)]
    if bad:
        raise ValueError(f"mvfa_ad: feature layers {bad} are not blocks of the backbone (1..{len(backbone.blocks)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return MvfaAdapters(backbone.width, int(bottleneck or text_dim), features, mix)


def load_adapters(path, backbone, k_shot: int | None = None) -> tuple[MvfaAdapters, dict, dict]:
    """``(adapters, meta, training options)`` of a checkpoint (rule train_fewshot); keys, shapes and k are
    checked (``meta["shots"]``: the shots' ids)."""
    from ..checkpoints import load_weights_only

    obj = load_weights_only(path, "mvfa_ad checkpoint")
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(obj.get(k), dict) for k in ("seg_adapters", "det_adapters")):
        raise ValueError(f"mvfa_ad checkpoint {path}: needs 'seg_adapters', 'det_adapters' and 'meta'")
    trained = json.loads(meta["train_config"])
    if k_shot is not None and int(meta.get("k_shot", -1)) != int(k_shot):
        raise ValueError(f"mvfa_ad checkpoint {path} holds {meta.get('k_shot')} shots, the backend wants {k_shot}")
    adapters = build_adapters(backbone, int(meta["text_dim"]), trained["features"], trained["bottleneck"],
                              trained["mix"], trained["seed"])
    state = {f"{part}.{k}": v for part in ("seg_adapters", "det_adapters") for k, v in obj[part].items()}
    expected = {k: tuple(v.shape) for k, v in adapters.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        raise ValueError(f"mvfa_ad checkpoint {path}: adapter shapes {got} do not fit the backbone ({expected})")
    adapters.load_state_dict(state)
    shots = json.loads(meta["shots"]) if isinstance(meta["shots"], str) else list(meta["shots"])
    return adapters.eval(), dict(meta, shots=shots), trained


def preprocess(images: list[np.ndarray], size: int, resolution: int) -> torch.Tensor:
    """``medical_few.py`` transform_x: PIL bicubic to ``size`` x ``size``, ToTensor (no normalisation); then the
    top-left ``resolution`` pixels, all that the stride-14 patch embedding reads."""
    out = np.stack([np.asarray(Image.fromarray(np.asarray(im)).resize((size, size), Image.BICUBIC), np.float32)
                    for im in images]) / 255.0
    return torch.from_numpy(out[:, :resolution, :resolution]).permute(0, 3, 1, 2).contiguous()


def zero_shot_map(seg: list[torch.Tensor], text: torch.Tensor, grid, size: int, temperature: float) -> torch.Tensor:
    """Sum over layers of ``softmax(bilinear(100 p @ T, size, align_corners=True))[abnormal]``: ``[N, size, size]``
    from the seg tokens (class token first)."""
    out = 0
    for p in seg:
        p = F.normalize(p[:, 1:], dim=-1)
        logits = (temperature * p @ text.to(p).T).transpose(1, 2).reshape(p.shape[0], 2, *grid)
        up = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True)
        out = out + torch.softmax(up, dim=1)[:, 1]
    return out


def few_shot_map(seg: list[torch.Tensor], memory: list[torch.Tensor], grid, size: int) -> torch.Tensor:
    """Sum over layers of ``bilinear(min_m (1 - cos(memory_m, p)), size, align_corners=True)``: ``[N, size, size]``
    (the memory's rows need not be normalised)."""
    out = 0
    for p, mem in zip(seg, memory):
        cos = F.normalize(p[:, 1:], dim=-1) @ F.normalize(mem.to(p), dim=-1).T
        dist = (1 - cos).min(dim=-1).values.reshape(p.shape[0], 1, *grid)
        out = out + F.interpolate(dist, size=(size, size), mode="bilinear", align_corners=True)[:, 0]
    return out


class MvfaBackend:
    """MVFA-AD maps and scores (:class:`~anorefiner.zsad.Backend`; scores images: its adapters change the forward)."""

    def __init__(self, config: MvfaConfig | None = None, backbone=None, name: str = "mvfa_ad", seed: int = 0,
                 images=None, train_images=None):
        from ..prompts import text_embeddings

        self.config = c = config or MvfaConfig()
        self.backbone, self.name, self.seed = backbone, name, int(seed)
        self.images, self.train_images = images, train_images
        if backbone is None or not hasattr(backbone, "embed"):
            raise ValueError("mvfa_ad needs the CLIP ViT backbone (ViT-L-14-336 at 238 px): pass --backbone")
        if c.k_shot < 1 or not c.checkpoint:
            raise ValueError("mvfa_ad needs k_shot >= 1 and option 'checkpoint' (adapters trained on the shots: "
                             "rule train_fewshot)")
        self.device = _resolve_device(c.device)
        self.adapters, meta, trained = load_adapters(c.checkpoint, backbone, c.k_shot)
        self.size = int(trained["image_size"])  # the training's resize: the maps are made at this size
        self.adapters.to(self.device)
        self.shots = meta["shots"]
        self.text = text_embeddings(backbone, c.class_name, c.prompt_set, c.text_cache or None).to(self.device)
        self.last_info = {"map_level": MAP_LEVEL, "map_size": self.size, "k_shot": c.k_shot, "shots": self.shots,
                          "checkpoint": str(c.checkpoint), "normalisation": "min-max over the category"}

    def tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return self.adapters(self.backbone, x.to(self.device))[0]

    def memory(self) -> list[torch.Tensor]:
        """Seg tokens of the augmented shots per layer, ``[11 k (1 + L), bottleneck]`` (class tokens included)."""
        from ..shots import augment_mvfa

        if self.train_images is None:
            raise ValueError("mvfa_ad needs the category's train/good images (--data-root)")
        c = self.config
        x = augment_mvfa(preprocess(self.train_images.load(self.shots), self.size, self.backbone.resolution))
        per = [self.tokens(x[a : a + c.batch_size]) for a in range(0, len(x), c.batch_size)]
        return [torch.cat([p[i] for p in per]).reshape(-1, per[0][i].shape[-1]) for i in range(len(per[0]))]

    def coarse(self, feats):
        from .. import CoarseResult

        if self.images is None:
            raise ValueError("mvfa_ad scores images: the coarse stage needs --data-root (the dataset folder)")
        c, grid = self.config, self.backbone.grid
        memory = self.memory()
        zero, few = [], []
        n = len(feats.ids)
        for a in progress(range(0, n, c.batch_size), desc="mvfa_ad", unit="batch"):
            seg = self.tokens(preprocess(self.images(list(range(a, min(n, a + c.batch_size)))), self.size,
                                         self.backbone.resolution))
            zero.append(zero_shot_map(seg, self.text, grid, self.size, c.temperature).cpu())
            few.append(few_shot_map(seg, memory, grid, self.size).cpu())
        full = 0.5 * minmax(torch.cat(zero)) + 0.5 * minmax(torch.cat(few))
        LOG.info("mvfa_ad: %d images, %d-shot memory of %d tokens per layer (%s)", n, c.k_shot, len(memory[0]),
                 MAP_LEVEL)
        return CoarseResult(maps=patch_map(full, grid).numpy().astype(np.float32),
                            scores=full.amax(dim=(-2, -1)).numpy().astype(np.float32))

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude):
        raise NotImplementedError("mvfa_ad scores images (its adapters change the image forward), so PGT cannot "
                                  "score pseudo-anomalies from cached tokens; refine another backend's maps")
