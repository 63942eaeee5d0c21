"""PromptAD (Li et al., CVPR 2024): learned normal/abnormal prompts and a visual gallery of the k normal shots.

Facts from ``FuNz-0/PromptAD@0f86ce0`` (docs/backends.md "PromptAD"):

* backbone ``ViT-B-16-plus-240`` with ``laion400m_e32`` weights at 240 px (``train_*.py`` l.224-226), run in
  fp16 there (``model.py`` l.174; fp32 here);
* the visual tower runs CLIP Surgery's dual path (``CLIPAD/transformer.py`` V2VTransformer.forward l.679-741,
  ResidualAttentionBlock l.215-262, Attention l.88-135): in the last 12 blocks (all of ViT-B/16+) the attention
  returns a value-value branch ``softmax(v v^T / sqrt(d)) v`` beside the original one; the original path is CLIP's
  forward, the v-v path accumulates ``x_vv += vv_attn(ln_1(x_ori))`` without MLPs. Outputs, each L2-normalised
  (``model.py`` encode_image l.238-243): the class embedding ``ln_post(x_ori[CLS]) @ proj``, the patch tokens
  ``ln_post(x_vv) @ proj`` and two raw patch-token galleries hooked at ``resblocks[2]`` and ``resblocks[7]``
  (blocks 3 and 8). The hooks keep a *view* of the original path that the next block adds its attention output
  to in place (``x_ori += x_ori_res``, l.235), so the gallery features are the residual stream after block 4's
  (and block 9's) attention sub-layer: reproduced as such (:func:`vv_forward`);
* textual map ``softmax(s x tokens @ T^T)[abnormal]`` and textual image score ``softmax(s x cls @ T^T)[abnormal]``
  with ``s`` CLIP's raw ``logit_scale`` (l.297-326); visual map ``0.5 x sum_g min_j (1 - f_g . G_gj) / 2`` over the
  two galleries of the k shots (l.331-342);
* segmentation (``train_seg.py``, prompts with ``n_pro = 1``): map ``1 / (1/textual + 1/visual)`` upsampled
  bilinearly (``align_corners=False``) to 400 px, Gaussian sigma 4 (l.344-367); classification (``train_cls.py``,
  ``n_pro = 3``): image score ``1 / (1/max(visual map at 400 px) + 1/textual score)`` (``utils/metrics.py``
  metric_cal_img l.20-24). The two tasks are two prompt learners trained separately; this backend uses the
  ``seg`` learner's text for the maps and the ``cls`` learner's for the scores;
* images (``datasets/dataset.py`` l.36-51): read by OpenCV (BGR), resized to 1024 x 1024 (bilinear), then to 240
  (PIL bicubic) and CLIP-normalised; the train shots are converted to RGB (``train_*.py`` l.44) but the *test*
  images are not (l.124-126): option ``bgr_test_images`` (default: as the official code).

Zero shots (PA-CLIP Table 1 "PromptAD 0-shot"): PromptAD's code has no zero-shot mode (``run_*.py`` shots 1, 2, 4;
the gallery and the training need images). ``k_shot: 0`` runs the textual branch alone with both prompt learners
at their seeded initialisation (no image, no training): map = the smoothed textual map, score = the textual
score. docs/backends.md says why.

Store: token-grid maps, the area mean of the 400-px map over each patch (``backend_info.map_level``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...log import LOG, progress
from ..april_gan.backend import patch_map
from ..maps import gaussian_smooth
from ..maps import resolve_device as _resolve_device
from .forward import PRE_RESIZE, SURGERY_BLOCKS, preprocess, vv_forward

MAP_LEVEL = "token grid: area mean of the official 400-px map (harmonic fusion, bilinear, Gaussian) per patch"


@dataclass
class PromptADConfig:
    """Options of the ``promptad`` backend (config ``backends.<name>.options``)."""

    k_shot: int = 4  # 0 = textual branch only (PA-CLIP's "0-shot" row, see the module docstring)
    checkpoint: str = ""  # trained prompts of this category and seed (rule train_fewshot); none for k_shot 0
    class_name: str = ""  # the category folder name; the coarse command passes it (ad_prompts.py keys)
    surgery_blocks: int = SURGERY_BLOCKS  # transformer.py l.684: the last 12 blocks get the v-v path
    gallery_blocks: tuple = (3, 8)  # transformer.py l.612-613: hooks on resblocks[2] and resblocks[7]
    map_size: int = 400  # train_*.py --resolution: maps are upsampled (and scored) at 400 px
    sigma: float = 4.0  # model.py l.364 gaussian_filter sigma
    pre_resize: int = PRE_RESIZE  # dataset.py l.46: cv2.resize to 1024 x 1024 before the 240-px transform
    bgr_test_images: bool = True  # train_*.py l.124-126 feed the test images in OpenCV's BGR order
    init_seed: int = 111  # k_shot 0: the prompt contexts' seed (train_*.py setup_seed(111))
    batch_size: int = 16
    device: str = "auto"


def textual(feats: torch.Tensor, text: torch.Tensor, scale) -> torch.Tensor:
    """``softmax(scale x feats @ text^T)[..., abnormal]`` (``model.py`` l.297-326)."""
    return torch.softmax(scale * feats @ text.to(feats).T, dim=-1)[..., 1]


def visual(gallery_feats: list[torch.Tensor], galleries: list[torch.Tensor]) -> torch.Tensor:
    """``model.py`` l.331-342: mean over the galleries of ``min_j (1 - f . G_j) / 2`` -> ``[N, L]``."""
    return torch.stack([(1.0 - f @ g.T).min(dim=-1).values / 2.0 for f, g in zip(gallery_feats, galleries)]).mean(0)


def harmonic(a, b):
    """``1 / (1/a + 1/b)`` as written in ``model.py`` l.352 and ``utils/metrics.py`` l.24 (half the harmonic mean)."""
    return 1.0 / (1.0 / a + 1.0 / b)


def upsample(grid_map: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """``[N, L]`` patch scores -> ``[N, size, size]``, bilinear, ``align_corners=False`` (``model.py`` l.357)."""
    m = grid_map.reshape(-1, 1, *grid).float()
    return F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


class PromptADBackend:
    """PromptAD maps and scores (:class:`~anorefiner.zsad.Backend`; scores images, not cached tokens).

    ``images``: ``indices -> list of uint8 test images``; ``train_images``: :class:`..shots.TrainGood` of the
    category (the coarse stage sets both from ``--data-root``).
    """

    def __init__(self, config: PromptADConfig | None = None, backbone=None, name: str = "promptad", seed: int = 0,
                 images=None, train_images=None):
        from .prompts import text_features
        from .train import TrainConfig, learners, load_prompts

        self.config = c = config or PromptADConfig()
        self.backbone, self.name, self.seed = backbone, name, int(seed)
        self.images, self.train_images = images, train_images
        if backbone is None or not hasattr(backbone, "embed"):
            raise ValueError("promptad needs an open_clip ViT backbone (ViT-B-16-plus-240): pass --backbone")
        if c.k_shot < 0:
            raise ValueError(f"promptad option k_shot must be >= 0, got {c.k_shot}")
        if not c.class_name:
            raise ValueError("promptad needs option class_name (the category; the coarse command passes it)")
        self.device = _resolve_device(c.device)
        if c.k_shot:
            if not c.checkpoint:
                raise ValueError("promptad k_shot > 0 needs option 'checkpoint' (prompts trained on the shots: rule "
                                 "train_fewshot)")
            prompts, meta = load_prompts(c.checkpoint, backbone, c.class_name, c.k_shot)
            self.shots = list(meta["shots"])
        else:
            prompts = learners(backbone, c.class_name, TrainConfig(seed=c.init_seed))
            self.shots = []
        with torch.no_grad():
            self.text = {task: text_features(learner.encode()).float() for task, learner in prompts.items()}
        self.scale = float(backbone.model.logit_scale.detach())
        self.last_info = {"map_level": MAP_LEVEL, "map_size": c.map_size, "k_shot": c.k_shot, "shots": self.shots,
                          "checkpoint": str(c.checkpoint), "logit_scale": self.scale,
                          "bgr_test_images": c.bgr_test_images}

    def encode(self, images: list[np.ndarray], bgr: bool) -> dict:
        c = self.config
        x = preprocess(self.backbone, images, c.pre_resize, bgr).to(self.device)
        return vv_forward(self.backbone, x, c.surgery_blocks, c.gallery_blocks)

    def galleries(self) -> list[torch.Tensor] | None:
        """The k shots' gallery tokens per gallery block (``build_image_feature_gallery``), None for 0 shots."""
        if not self.shots:
            return None
        if self.train_images is None:
            raise ValueError("promptad k_shot > 0 needs the category's train/good images (--data-root)")
        feats = self.encode(self.train_images.load(self.shots), bgr=False)["gallery"]
        return [f.reshape(-1, f.shape[-1]) for f in feats]

    def score_batch(self, images: list[np.ndarray], galleries) -> tuple[torch.Tensor, torch.Tensor]:
        """Test images -> (maps ``[B, S, S]`` at ``map_size``, image scores ``[B]``)."""
        c, grid = self.config, self.backbone.grid
        f = self.encode(images, bgr=c.bgr_test_images)
        text_map = textual(f["tokens"], self.text["seg"], self.scale)
        text_score = textual(f["cls"], self.text["cls"], self.scale)
        if galleries is None:
            return gaussian_smooth(upsample(text_map, grid, c.map_size), c.sigma), text_score
        vis = visual(f["gallery"], galleries)
        full = gaussian_smooth(upsample(harmonic(text_map, vis), grid, c.map_size), c.sigma)
        return full, harmonic(upsample(vis, grid, c.map_size).amax(dim=(-2, -1)), text_score)

    def coarse(self, feats):
        from .. import CoarseResult

        if self.images is None:
            raise ValueError("promptad scores images: the coarse stage needs --data-root (the dataset folder)")
        galleries = self.galleries()
        n, bs = len(feats.ids), self.config.batch_size
        maps, scores = [], []
        for a in progress(range(0, n, bs), desc="promptad", unit="batch"):
            full, s = self.score_batch(self.images(list(range(a, min(n, a + bs)))), galleries)
            maps.append(patch_map(full.float().cpu(), self.backbone.grid))
            scores.append(s.float().cpu())
        LOG.info("promptad: %d images, %d-shot (%s)", n, self.config.k_shot, MAP_LEVEL)
        return CoarseResult(maps=torch.cat(maps).numpy().astype(np.float32),
                            scores=torch.cat(scores).numpy().astype(np.float32))

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude):
        raise NotImplementedError("promptad scores images (its dual-path forward), so PGT cannot score "
                                  "pseudo-anomalies from cached tokens; refine another backend's maps")
