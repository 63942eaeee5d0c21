"""AdaCLIP (ECCV 2024): hybrid static + dynamic prompts in both CLIP towers, per-layer patch heads and
hybrid semantic fusion (HSF) for the image score.

Facts from ``caoyunkang/AdaCLIP@e27ee32`` (specs/tta.md Part B.2; ``method/adaclip.py``,
``method/trainer.py``); the prompts and heads are in :mod:`.adaclip_prompts`:

* text (``TextEmbebddingLayer``): class-aware, APRIL-GAN's 7 normal / 5 abnormal states x 4 templates
  (prompt set ``adaclip`` below), hyphens of the class name replaced by spaces, encoded WITH the text
  prompts (so once per image: the dynamic prompts depend on it); per state the mean of the normalised
  embeddings, normalised -> ``T [2, E]``;
* maps (``visual_text_similarity``): logits_l = 100 * <patch_l, t> per output layer, bilinear to the input
  size (align_corners=True) on the logits; test: mean of the logits over layers, softmax, p_abnormal
  (the official ``(p_abn + 1 - p_norm) / 2`` is the same number); Gaussian sigma 4 (``trainer.py``
  evaluation); training: softmax per layer;
* image score (``HybridSemanticFusion``, the code's "upgraded" version): p_abnormal per token from the
  layer-mean token logits; the top ``5k`` tokens (k = 20 clusters); KMeans on their concatenated
  per-layer features; per cluster the mean of its tokens over all layers; the MEAN of the cluster centres,
  normalised = h; image feature = normalise(0.2 h + 0.8 c) with c the cls head's output on the pooled
  feature of the PROMPTED forward (``extract_feat`` feeds ``encode_image``'s output; specs/tta.md B.2 says g,
  option ``cls_input``);
  score = softmax(100 <image feature, t>)[abnormal].

Deviations (options, see :class:`AdaClipConfig`): KMeans is seeded (``random_state`` = the run's seed,
``n_init`` fixed) so the score is deterministic (the official one is not); k and the top count are
clamped to the number of tokens (tiny CLIP); an empty cluster is skipped instead of giving NaN; fp32
instead of CUDA fp16 autocast (``AdaCLIP.forward`` is decorated with ``torch.cuda.amp.autocast``, a no-op on
CPU). Reproduced by default, as the official code runs even without autocast: the prompts' explicit fp16
rounding (option ``prompt_precision``, :mod:`.adaclip_prompts`) and the position embedding resized by plain
bicubic without antialias (option ``pos_embed``; ``method/clip_model.py`` ``resize_pos_embed``, l.382-412;
the backbone's own resize is antialiased, as APRIL-GAN's and VCP-CLIP's).

Store choice: the coarse store holds token-grid maps, the area mean of the full-resolution (smoothed)
map over each patch's pixels (``map_level``), as :mod:`.april_gan`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...backbones.clip_vit import POS_EMBED_RESIZE, with_pos_embed
from ...log import LOG
from .prompts import (PROMPT_PRECISIONS, AdaClipModel, SentenceBank, frozen_pooled, load_model,
                              prompted_text, prompted_visual)
from ..april_gan.backend import layer_logits, patch_map
from ..maps import gaussian_smooth
from ..maps import resolve_device as _resolve_device
from ..prompts import APRIL_ABNORMAL, APRIL_NORMAL, APRIL_TEMPLATES, PromptSet

#: ``TextEmbebddingLayer``: APRIL-GAN's states with the first 4 of its templates (the same 4 sentences)
ADACLIP_PROMPTS = PromptSet("adaclip", APRIL_NORMAL, APRIL_ABNORMAL, APRIL_TEMPLATES[:4], "normalized_mean")
CLS_INPUTS = ("prompted", "frozen")
MAP_LEVEL = ("token grid: area mean of the official map (layer-mean bilinear logits -> softmax -> p_abn -> "
             "Gaussian) per patch")



@dataclass
class AdaClipConfig:
    """Options of the ``adaclip`` backend (config ``backends.<name>.options``)."""

    checkpoint: str = ""  # prompts + heads file; the coarse rule passes the trained or official one
    class_name: str = ""  # prompt class name; the coarse command passes the category verbatim (official)
    prompt_length: int = 5  # train.py --prompting_length 5 (the paper's L)
    prompt_depth: int = 4  # train.py --prompting_depth 4 (the paper's J)
    temperature: float = 100.0  # adaclip.py visual_text_similarity: fixed 100 for maps and scores
    use_hsf: bool = True  # train.py --use_hsf True
    k_clusters: int = 20  # train.py --k_clusters 20; top tokens = 5 k (HybridSemanticFusion)
    hsf_alpha: float = 0.2  # adaclip.py visual_text_similarity alpha = 0.2
    kmeans_n_init: int = 1  # sklearn's n_init="auto" = 1 run for k-means++ (the official setting)
    sigma: float = 4.0  # trainer.py evaluation: gaussian_filter(sigma=4) of the full-resolution map
    map_size: int | None = None  # official upsampling size (image_size); None = the backbone's input size
    batch_size: int = 4  # images per forward (each image also encodes its 48 prompted sentences)
    cls_input: str = "prompted"  # cls head input: "prompted" = pooled feature of the prompted forward
    #   (adaclip.py extract_feat -> encode_image, the official code); "frozen" = g of the prompt-free pass
    #   (specs/tta.md B.2 reads it so; kept as the named alternative)
    pos_embed: str = "bicubic_no_antialias"  # method/clip_model.py resize_pos_embed (bicubic, no antialias);
    #   "bicubic": the backbone's antialiased resize (APRIL-GAN/VCP-CLIP's), "bilinear" (AnomalyCLIP's)
    prompt_precision: str = "float16"  # method/adaclip.py l.87/118/123: prompts .half() before every block,
    #   even without autocast; "float32" keeps them unrounded
    device: str = "auto"


def check_precision_options(c) -> None:
    """``pos_embed`` and ``prompt_precision`` (shared by the backend and training configs) are known values."""
    if c.pos_embed not in POS_EMBED_RESIZE:
        raise ValueError(f"adaclip option pos_embed {c.pos_embed!r} is not one of {POS_EMBED_RESIZE}")
    if c.prompt_precision not in PROMPT_PRECISIONS:
        raise ValueError(f"adaclip option prompt_precision {c.prompt_precision!r} is not one of {PROMPT_PRECISIONS}")


def upsample(logits: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, 2, h, w]`` logits -> bilinear ``[B, 2, size, size]`` (align_corners=True), as the official."""
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True)


def official_map(logits: list[torch.Tensor], size: int) -> torch.Tensor:
    """Test-time map ``[B, size, size]``: mean of the upsampled logits over layers, softmax, p_abnormal."""
    mean = torch.stack([upsample(lg, size) for lg in logits], 0).mean(0)
    return torch.softmax(mean, dim=1)[:, 1]


def token_abnormality(token_logits: list[torch.Tensor]) -> torch.Tensor:
    """``[B, P, 2]`` per layer -> p_abnormal ``[B, P]`` of the layer-mean logits (HSF's selection)."""
    return torch.softmax(torch.stack(token_logits, 0).mean(0), dim=-1)[..., 1]


def hsf_counts(n_tokens: int, k_clusters: int) -> tuple[int, int]:
    """(top-token count, clusters): 5 k tokens and k clusters, clamped to the tokens available."""
    top = min(n_tokens, 5 * k_clusters)
    return top, max(1, min(k_clusters, top))


def kmeans_labels(data: np.ndarray, k: int, seed: int, n_init: int = 1) -> np.ndarray:
    """sklearn KMeans(k, k-means++, ``random_state=seed``) labels: deterministic for one seed."""
    import warnings

    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate points (tiny models) warn about fewer distinct clusters
        return KMeans(n_clusters=k, n_init=n_init, random_state=int(seed)).fit_predict(data.astype(np.float64))


def hsf_feature(selected: list[torch.Tensor], labels: np.ndarray) -> torch.Tensor:
    """One image: selected tokens ``[T, E]`` per layer and cluster labels ``[T]`` -> normalised ``[E]``:
    per cluster the mean of its tokens over all layers, then the mean of the centres."""
    lab = torch.as_tensor(np.asarray(labels), device=selected[0].device)
    stacked = torch.stack(selected, 0)  # [layers, T, E]
    centres = [stacked[:, lab == c].reshape(-1, stacked.shape[-1]).mean(0) for c in torch.unique(lab).tolist()]
    return F.normalize(torch.stack(centres, 0).mean(0), dim=-1)


def hsf(patch_feats: list[torch.Tensor], token_logits: list[torch.Tensor], k_clusters: int, seed: int,
        n_init: int = 1, labels=None) -> torch.Tensor:
    """HSF features ``[B, E]`` (``HybridSemanticFusion.forward``); ``labels`` (per image) skips KMeans."""
    p_abn = token_abnormality(token_logits)
    top, k = hsf_counts(p_abn.shape[1], k_clusters)
    idx = torch.topk(p_abn, k=top, dim=1).indices
    out = []
    for b in range(p_abn.shape[0]):
        sel = [f[b, idx[b]] for f in patch_feats]
        lab = labels[b] if labels is not None else kmeans_labels(
            torch.cat(sel, -1).detach().cpu().numpy(), k, seed, n_init)
        out.append(hsf_feature(sel, lab))
    return torch.stack(out, 0)


def image_probs(cls_feat: torch.Tensor, text: torch.Tensor, temperature: float, fused: torch.Tensor | None = None,
                alpha: float = 0.2) -> torch.Tensor:
    """``softmax(100 <f, t>)`` ``[B, 2]``, f = normalise(alpha HSF + (1 - alpha) cls) (cls alone without HSF)."""
    f = cls_feat if fused is None else F.normalize(alpha * fused + (1 - alpha) * cls_feat, dim=-1)
    return torch.softmax(temperature * torch.einsum("be,bce->bc", f, text.to(f.dtype)), dim=-1)


def adaclip_forward(backbone, model: AdaClipModel, bank: SentenceBank, x: torch.Tensor, config: AdaClipConfig,
                    seed: int) -> dict:
    """The whole official forward of a batch: per-layer patch features, token logits ``[B, 2, h, w]``,
    text ``[B, 2, E]``, the cls head's feature ``[B, E]`` and image probabilities ``[B, 2]`` (gradients reach the
    prompts and heads).

    ``backbone`` already carries the position embedding of ``config.pos_embed`` (:func:`with_pos_embed`)."""
    g = frozen_pooled(backbone, x)
    dyn_vis, dyn_txt = model.dynamic_prompts(g)
    tokens, pooled = prompted_visual(backbone, model, x, dyn_vis, config.prompt_precision)
    text = prompted_text(backbone, model, bank, dyn_txt, config.prompt_precision)
    feats = model.patch_features([t.float() for t in tokens])
    if config.cls_input not in CLS_INPUTS:
        raise ValueError(f"adaclip option cls_input {config.cls_input!r} is not one of {CLS_INPUTS}")
    cls_feat = model.cls_feature((pooled if config.cls_input == "prompted" else g).float())
    grid = tuple(backbone.grid)
    logits = [layer_logits(p, text, grid, config.temperature) for p in feats]
    fused = None
    if config.use_hsf:
        flat = [lg.flatten(2).transpose(1, 2) for lg in logits]
        fused = hsf(feats, flat, config.k_clusters, seed, config.kmeans_n_init)
    probs = image_probs(cls_feat, text, config.temperature, fused, config.hsf_alpha)
    return {"feats": feats, "logits": logits, "text": text, "cls": cls_feat, "probs": probs}


def class_bank(backbone, class_name: str) -> SentenceBank:
    """The sentences of ``class_name`` (hyphens -> spaces, as ``TextEmbebddingLayer.encode_text``)."""
    if not isinstance(class_name, str) or not class_name.strip():
        raise ValueError(f"adaclip needs option 'class_name' (the category), got {class_name!r}")
    normal, abnormal = ADACLIP_PROMPTS.sentences(class_name.replace("-", " "))
    return SentenceBank(backbone, normal, abnormal)


class AdaClipBackend:
    """AdaCLIP maps and scores as a :class:`~anorefiner.zsad.Backend` (runs its own forward from images).

    ``images``: ``indices -> list of uint8 [H,W,3]`` test images (set by the coarse stage).
    """

    def __init__(self, config: AdaClipConfig | None = None, backbone=None, name: str = "adaclip", seed: int = 0,
                 images=None):
        self.config = c = config or AdaClipConfig()
        self.name, self.seed, self.images = name, int(seed), images
        if backbone is None or not hasattr(backbone, "image_embedding") or not hasattr(backbone, "visual"):
            raise ValueError("adaclip needs the CLIP ViT backbone (both towers): pass --backbone")
        check_precision_options(c)
        self.backbone = backbone = with_pos_embed(backbone, c.pos_embed)
        if not c.checkpoint:
            raise ValueError("adaclip needs option 'checkpoint' (trained prompts: rule train_backend, or the "
                             "official files, backends.<name>.weights: official)")
        if c.cls_input not in CLS_INPUTS:
            raise ValueError(f"adaclip option cls_input {c.cls_input!r} is not one of {CLS_INPUTS}")
        if c.k_clusters < 1 or c.batch_size < 1 or not 0 <= c.hsf_alpha <= 1:
            raise ValueError(f"adaclip: k_clusters {c.k_clusters} and batch_size {c.batch_size} must be >= 1, "
                             f"hsf_alpha {c.hsf_alpha} in [0, 1]")
        self.model = load_model(c.checkpoint, backbone).to(backbone.device).eval().requires_grad_(False)
        if (self.model.length, self.model.depth) != (c.prompt_length, c.prompt_depth):
            raise ValueError(f"adaclip checkpoint {c.checkpoint}: prompts of length {self.model.length} and depth "
                             f"{self.model.depth}, options say {c.prompt_length} and {c.prompt_depth}")
        self.device = _resolve_device(c.device)
        self.bank = class_bank(backbone, c.class_name)
        self.map_size = int(c.map_size or backbone.resolution)
        self.last_info = {"map_level": MAP_LEVEL, "map_size": self.map_size, "checkpoint": str(c.checkpoint),
                          "sigma": float(c.sigma), "hsf": bool(c.use_hsf), "k_clusters": int(c.k_clusters),
                          "kmeans_seed": self.seed, "cls_input": c.cls_input, "pos_embed": c.pos_embed,
                          "prompt_precision": c.prompt_precision}

    def _batch(self, idx: list[int]):
        x = self.backbone.preprocess(self.images(idx))
        with torch.no_grad():
            out = adaclip_forward(self.backbone, self.model, self.bank, x, self.config, self.seed)
            full = gaussian_smooth(official_map(out["logits"], self.map_size), self.config.sigma)
        grid = tuple(self.backbone.grid)
        return out, patch_map(full.float(), grid), out["probs"][:, 1]

    def features_and_scores(self, indices) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """For PA-CLIP's PAD+PAM on top: ``({layer: [N, h, w, E]} normalised head outputs, token-grid
        maps [N, h, w], scores [N])`` of the test images ``indices``."""
        if self.images is None:
            raise ValueError("adaclip scores images: the coarse stage needs --data-root (the dataset folder)")
        indices = [int(i) for i in indices]
        h, w = self.backbone.grid
        feats: dict = {k: [] for k in self.backbone.layers}
        maps, scores = [], []
        from ...log import progress

        for a in progress(range(0, len(indices), self.config.batch_size), desc="adaclip", unit="batch"):
            idx = indices[a : a + self.config.batch_size]
            out, m, s = self._batch(idx)
            for k, f in zip(self.backbone.layers, out["feats"]):
                feats[k].append(f.reshape(len(idx), h, w, -1).float().cpu())
            maps.append(m.float().cpu())
            scores.append(s.float().cpu())
        if not maps:
            raise ValueError("adaclip: no images to score")
        return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(maps), torch.cat(scores)

    def coarse(self, feats):
        from .. import CoarseResult

        n = len(feats.ids)
        _, maps, scores = self.features_and_scores(range(n))
        LOG.info("adaclip: %d images, maps %s (%s)", n, tuple(maps.shape[1:]), MAP_LEVEL)
        return CoarseResult(maps=maps.numpy().astype(np.float32), scores=scores.numpy().astype(np.float32))

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude):
        raise NotImplementedError(
            "adaclip prompts the image tower from its first block, so PGT cannot score pseudo-anomalies from "
            "cached tokens; refine another backend's maps")
