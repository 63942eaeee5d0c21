"""WinCLIP (Jeong et al., CVPR 2023), training-free, as anomalib implements it.

Facts from ``anomalib@b723368 src/anomalib/models/image/winclip/`` (specs/backends.md section 4):

* backbone ``ViT-B-16-plus-240`` with ``laion400m_e31`` weights at 240 px (15x15 grid);
* pre-processing (option ``resize``): the image as a float tensor in [0, 1], torchvision's
  ``Resize((240, 240), bicubic, antialias=True)`` on it, CLIP's normalisation (``lightning_model.py``
  ``configure_pre_processor``, ``anomalib/data/utils/image.py`` ``read_image``): :func:`tensor_preprocess`.
  The backbone's own preprocessing resizes the uint8 image with PIL, which clamps and rounds to uint8 (up to
  5/255 apart on noisy images; docs/fidelity.md);
* text: the WinCLIP prompt set (7 normal / 4 anomalous states x 21 templates), mean of the
  un-normalised embeddings per group (:mod:`.prompts`, set ``winclip``);
* class score of an embedding e: ``softmax(cos(e, T) / 0.07)[anomalous]`` (``utils.py`` class_scores);
* window embeddings: for every k x k window (k in ``scales`` = (2, 3), stride 1) the class token plus
  the window's tokens, taken from the embedded sequence (after position embedding, before
  ``ln_pre``), run through the full transformer, ``ln_post(CLS) @ proj`` (``torch_model.py``);
* per scale, harmonic aggregation: a patch gets ``n_covering / sum(1 / score)`` over the windows
  covering it (``utils.py`` harmonic_aggregation);
* zero-shot map = harmonic mean of [image score broadcast, scale maps]; image score = the image
  embedding's class score;
* k-shot (``k_shot`` > 0, PA-CLIP Tables 1-2 "4-shot"): reference windows and ``ln_post`` patch
  tokens of k seeded ``train/good`` images; visual association score = min cosine distance / 2
  to any reference embedding of the same scale; few-shot map = mean of [patch scale, harmonic
  window scales]; map = (zero-shot + few-shot) / 2; image score = (zero-shot + few-shot max) / 2.

All windows of a batch go through the transformer in one call and the harmonic aggregation is an
``index_add`` (anomalib loops over patches); ``benchmarks/bench_winclip.py`` compares both with a
per-window loop. The store keeps the 15x15 map (anomalib upsamples it bilinearly to 240 for metrics).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...log import LOG
from ..maps import resolve_device as _resolve_device


#: ``resize`` option: anomalib's float-tensor resize (:func:`tensor_preprocess`), or the backbone's PIL resize.
RESIZE_MODES = ("tensor", "pil")


def tensor_preprocess(images, size: int, mean, std) -> torch.Tensor:
    """uint8 ``[H,W,3]`` images -> ``[N,3,size,size]`` as anomalib's WinCLIP pre-processor: ``x * (1/255)`` in
    float32, bicubic resize with antialias and ``align_corners=False`` (no clamping, no rounding), then
    ``(x - mean) / std``."""
    out = []
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"winclip: image {i} must be uint8 [H,W,3] RGB, got dtype {img.dtype} shape {img.shape}")
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].to(torch.float32).mul_(1.0 / 255)
        out.append(F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0])
    mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (torch.stack(out) - mean) / std


@dataclass
class WinClipConfig:
    """Options of the ``winclip`` backend (config ``backends.<name>.options``)."""

    class_name: str = ""  # anomalib: the datamodule's category verbatim; the coarse command passes it
    prompt_set: str = "winclip"  # anomalib prompting.py
    scales: tuple = (2, 3)  # anomalib default window sizes (in patches)
    temperature: float = 0.07  # anomalib torch_model.py
    k_shot: int = 0  # 0 = zero-shot; PA-CLIP's "4-shot" row uses 4 seeded train/good images
    resize: str = "tensor"  # anomalib's pre-processor (float tensor); "pil": the backbone's (see module doc)
    batch_size: int = 8  # images per window pass (a batch of 8 at 240 px = 2920 short sequences)
    text_cache: str = ""  # per-class text cache folder ("" = none); the workflow: results/text
    device: str = "auto"


def window_indices(grid: tuple[int, int], k: int) -> torch.Tensor:
    """``[n_windows, k*k]`` flat patch indices of every k x k window (stride 1), row-major windows."""
    h, w = grid
    if k > h or k > w:
        raise ValueError(f"winclip: window size {k} does not fit the {h}x{w} token grid")
    rows = [[(i + a) * w + (j + b) for a in range(k) for b in range(k)] for i in range(h - k + 1) for j in range(w - k + 1)]
    return torch.tensor(rows, dtype=torch.long)


def window_embeddings(backbone, seq: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Embedded sequences ``[B, 1+L, C]`` -> window embeddings ``[B, n_windows, D]``, one transformer call."""
    b, _, c = seq.shape
    idx = torch.cat([torch.zeros(len(windows), 1, dtype=torch.long), windows + 1], dim=1).to(seq.device)
    picked = seq[:, idx]  # [B, n_windows, 1+k*k, C]
    emb = backbone.encode_sequences(picked.reshape(b * len(windows), idx.shape[1], c))
    return emb.reshape(b, len(windows), -1)


def class_scores(emb: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(cos(emb, text) / temperature)[..., anomalous]`` for ``emb [..., D]``, ``text [2, D]``."""
    emb = emb.float() if emb.dtype in (torch.float16, torch.bfloat16) else emb
    cos = F.normalize(emb, dim=-1) @ F.normalize(text.to(emb), dim=-1).T
    return torch.softmax(cos / temperature, dim=-1)[..., 1]


def harmonic_aggregation(scores: torch.Tensor, windows: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Window scores ``[B, n_windows]`` -> ``[B, h, w]``: per patch, n_covering / sum of 1/score."""
    b = scores.shape[0]
    n = grid[0] * grid[1]
    flat = windows.reshape(-1).to(scores.device)  # window-major: window i's patches at i*k*k...
    inv = (1.0 / scores).repeat_interleave(windows.shape[1], dim=1)
    total = torch.zeros(b, n, dtype=scores.dtype, device=scores.device).index_add_(1, flat, inv)
    count = torch.zeros(n, dtype=scores.dtype, device=scores.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=scores.dtype))
    return (count / total).nan_to_num(posinf=0.0).reshape(b, *grid)


def visual_association(emb: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``[B, n, D]`` against any of ``[R, D]``: min cosine distance / 2 (WinCLIP Eq. 4)."""
    emb = emb.float() if emb.dtype in (torch.float16, torch.bfloat16) else emb
    cos = F.normalize(emb, dim=-1) @ F.normalize(reference.to(emb), dim=-1).T
    return (1 - cos).min(dim=-1).values / 2


def train_good_source(root, dataset: str, category: str):
    """``(k, seed) -> k`` uint8 train/good images of the category, drawn without replacement by ``seed``
    (:class:`..shots.TrainGood`: the shots every few-shot backend draws at that seed)."""
    from ..shots import TrainGood

    source = TrainGood(root, dataset, category)
    return lambda k, seed: source.load(source.draw(k, seed, "winclip"))


class WinClipBackend:
    """WinCLIP maps and scores as a :class:`~anorefiner.zsad.Backend` (scores images, not cached tokens).

    ``images``: ``indices -> list of uint8 [H,W,3]`` test images (set by the coarse stage);
    ``reference_images``: ``(k, seed) -> list`` of train/good images for the k-shot mode.
    """

    def __init__(self, config: WinClipConfig | None = None, backbone=None, name: str = "winclip", seed: int = 0,
                 images=None, reference_images=None):
        self.config = c = config or WinClipConfig()
        self.backbone, self.name, self.seed = backbone, name, int(seed)
        self.images, self.reference_images = images, reference_images
        if backbone is None or not hasattr(backbone, "encode_sequences"):
            raise ValueError("winclip needs an open_clip ViT backbone (e.g. ViT-B-16-plus-240): pass --backbone")
        if c.k_shot < 0:
            raise ValueError(f"winclip option k_shot must be >= 0, got {c.k_shot}")
        if c.k_shot and backbone.layers[-1] != str(len(backbone.blocks)):
            raise ValueError(f"winclip k_shot needs the last block's tokens; the backbone taps {backbone.layers}")
        if not c.scales or any(int(k) < 1 for k in c.scales):
            raise ValueError(f"winclip option scales must be positive window sizes, got {c.scales}")
        if c.resize not in RESIZE_MODES:
            raise ValueError(f"winclip option resize must be one of {RESIZE_MODES}, got {c.resize!r}")
        self.device = _resolve_device(c.device)
        from ..prompts import text_embeddings

        self.text = text_embeddings(backbone, c.class_name, c.prompt_set, c.text_cache or None)
        self.grid = tuple(backbone.grid)
        self.windows = [window_indices(self.grid, int(k)) for k in c.scales]
        self.last_info: dict = {"scales": list(c.scales), "k_shot": int(c.k_shot), "resize": c.resize}
        self._refs = None

    def preprocess(self, images) -> torch.Tensor:
        """uint8 images -> the backbone's input batch, resized as option ``resize`` says."""
        bb = self.backbone
        if self.config.resize == "pil":
            return bb.preprocess(images)
        return tensor_preprocess(images, bb.resolution, bb.mean, bb.std)

    def encode(self, batch: torch.Tensor):
        """Preprocessed images -> (image embeddings ``[B,D]``, windows per scale, ln_post patch tokens)."""
        bb = self.backbone
        seq = bb.embed(batch)
        image = bb.encode_sequences(seq)
        wins = [window_embeddings(bb, seq, w) for w in self.windows]
        patches = None
        if self.config.k_shot:
            layers, _ = bb.forward(batch)
            last = layers[bb.layers[-1]]
            patches = bb.token_embedding(last.reshape(last.shape[0], -1, last.shape[-1]))
        return image, wins, patches

    def _references(self):
        if self._refs is None:
            if self.reference_images is None:
                raise ValueError("winclip k_shot > 0 needs the category's train/good images (--data-root)")
            imgs = self.reference_images(self.config.k_shot, self.seed)
            _, wins, patches = self.encode(self.preprocess(imgs))
            self._refs = ([w.reshape(-1, w.shape[-1]) for w in wins], patches.reshape(-1, patches.shape[-1]))
        return self._refs

    def score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed images -> (maps ``[B,h,w]``, image scores ``[B]``)."""
        c = self.config
        text = self.text.to(self.backbone.device)
        image, wins, patches = self.encode(batch)
        img_score = class_scores(image, text, c.temperature)
        per_scale = [img_score.view(-1, 1, 1).expand(-1, *self.grid)]
        per_scale += [harmonic_aggregation(class_scores(w, text, c.temperature), idx, self.grid)
                      for w, idx in zip(wins, self.windows)]
        zero = len(per_scale) / sum(1.0 / m for m in per_scale)
        if not c.k_shot:
            return zero, img_score
        ref_wins, ref_patches = self._references()
        few = [visual_association(patches, ref_patches).reshape(-1, *self.grid)]
        few += [harmonic_aggregation(visual_association(w, r), idx, self.grid)
                for w, r, idx in zip(wins, ref_wins, self.windows)]
        few_map = torch.stack(few).mean(0)
        return (zero + few_map) / 2, (img_score + few_map.amax(dim=(-2, -1))) / 2

    def coarse(self, feats):
        from ...log import progress
        from .. import CoarseResult

        if self.images is None:
            raise ValueError("winclip scores images: the coarse stage needs --data-root (the dataset folder)")
        n = len(feats.ids)
        maps, scores = [], []
        for a in progress(range(0, n, self.config.batch_size), desc="winclip", unit="batch"):
            idx = list(range(a, min(n, a + self.config.batch_size)))
            m, s = self.score_batch(self.preprocess(self.images(idx)))
            maps.append(m.float().cpu())
            scores.append(s.float().cpu())
        LOG.info("winclip: %d images, scales %s, %d-shot", n, list(self.config.scales), self.config.k_shot)
        return CoarseResult(maps=torch.cat(maps).numpy().astype(np.float32),
                            scores=torch.cat(scores).numpy().astype(np.float32))

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude):
        raise NotImplementedError(
            "winclip scores images (its windows start before the first block), so PGT cannot score "
            "pseudo-anomalies from cached tokens; refine another backend's maps")
