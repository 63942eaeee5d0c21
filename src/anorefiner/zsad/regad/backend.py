"""RegAD (Huang et al., ECCV 2022): a registration network trained on the *other* categories, then a Gaussian of
the k augmented normal shots' registered features per position (``MediaBrain-SJTU/RegAD@5e2c1f8`` ``test.py``).

At test time (``test.py`` test l.100-180; docs/backends.md "RegAD"):

* images resized to 224 (PIL ``ANTIALIAS`` = Lanczos) and only scaled to [0, 1], *not* ImageNet-normalised
  (``datasets/mvtec.py`` l.176-180: the normalisation is commented out);
* the k shots are augmented 22-fold (:func:`..shots.augment_regad`); their registered features of the three
  stages (:class:`.model.StnResNet`, eval mode) are concatenated at stage 1's resolution (``embedding_concat``:
  each deeper cell repeated over its block, :func:`embedding_concat`), 64 + 128 + 256 = 448 channels at 56 x 56;
* per position a Gaussian: mean and ``torch.cov`` (unbiased) + 0.01 I (l.152-160); a test image's map is the
  Mahalanobis distance per position, bilinearly upsampled to 224 (``align_corners=False``), Gaussian sigma 4
  (l.206-215); all maps of the category are min-max normalised together and the image score is the maximum of
  the normalised map (``test.py`` main l.75-82).

The Siamese heads (``ENC``/``PRED``) only train the registration: the official test computes their cosine map
too but scores with the Gaussian alone, as here. The official code averages 10 support sets (``--inferences``,
fixed files); here one set per run seed, the table averaging the seeds.

Store: token-grid maps (the area mean of the 224-px map over the backbone's grid, ``backend_info.map_level``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...log import LOG, progress
from ..april_gan.backend import patch_map
from ..maps import gaussian_smooth, minmax
from ..maps import resolve_device as _resolve_device

MAP_LEVEL = "token grid: area mean of the official 224-px map (Mahalanobis, bilinear, Gaussian, category min-max)"


@dataclass
class RegADConfig:
    """Options of the ``regad`` backend (config ``backends.<name>.options``)."""

    k_shot: int = 4  # the row's shots (train/good images drawn by the run seed)
    checkpoint: str = ""  # the registration network trained on the other categories (rule train_fewshot)
    ridge: float = 0.01  # test.py l.256: cov + 0.01 I
    sigma: float = 4.0  # test.py l.313: gaussian_filter sigma 4
    position_chunk: int = 256  # positions per covariance/inverse block (memory only; the result does not change)
    batch_size: int = 32
    device: str = "auto"


def preprocess(images: list[np.ndarray], size: int) -> torch.Tensor:
    """``Resize(size, ANTIALIAS)`` + ``ToTensor`` (no normalisation); every image made square (the official
    resizes the shorter side, which only works for MVTec AD's square images)."""
    out = np.stack([np.asarray(Image.fromarray(np.asarray(im)).resize((size, size), Image.LANCZOS), np.float32)
                    for im in images]) / 255.0
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def embedding_concat(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``utils/funcs.py`` embedding_concat: ``y``'s cells repeated over the ``s x s`` blocks of ``x``, concatenated
    on channels (``s = H_x // H_y``, the unfold/fold of the official is this nearest-neighbour repeat)."""
    s = x.shape[-2] // y.shape[-2]
    if y.shape[-2] * s != x.shape[-2] or y.shape[-1] * s != x.shape[-1]:
        raise ValueError(f"regad: feature grids {tuple(x.shape[-2:])} and {tuple(y.shape[-2:])} are not multiples")
    return torch.cat([x, y.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)], dim=1)


def embeddings(net, x: torch.Tensor) -> torch.Tensor:
    """Registered, concatenated stage features ``[B, C, H, W]`` of images ``x`` (``net`` in eval mode)."""
    with torch.no_grad():
        _, (e1, e2, e3) = net(x, registered=True)
    return embedding_concat(embedding_concat(e1, e2), e3)


def gaussian(emb: torch.Tensor, ridge: float, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position mean ``[C, P]`` and precision ``inv(cov + ridge I)`` ``[P, C, C]`` of ``emb [M, C, P]``
    (``torch.cov``: unbiased)."""
    m, c, n_pos = emb.shape
    if m < 2:
        raise ValueError("regad: the Gaussian needs at least 2 support samples")
    mean = emb.mean(0)
    eye = torch.eye(c, dtype=emb.dtype, device=emb.device)
    prec = []
    for a in range(0, n_pos, chunk):
        d = emb[:, :, a : a + chunk] - mean[:, a : a + chunk]
        cov = torch.einsum("mcp,mdp->pcd", d, d) / (m - 1) + ridge * eye
        prec.append(torch.linalg.inv(cov))
    return mean, torch.cat(prec)


def mahalanobis(emb: torch.Tensor, mean: torch.Tensor, prec: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``[B, C, P]`` -> ``[B, P]``: ``sqrt(d^T P d)`` per position (``mahalanobis_torch``; clamped at 0 against
    rounding)."""
    out = []
    for a in range(0, emb.shape[-1], chunk):
        d = emb[:, :, a : a + chunk] - mean[:, a : a + chunk]
        out.append(torch.einsum("bcp,pcd,bdp->bp", d, prec[a : a + chunk], d).clamp_min(0).sqrt())
    return torch.cat(out, 1)


class RegADBackend:
    """RegAD maps and scores (:class:`~anorefiner.zsad.Backend`; scores images with its own network)."""

    def __init__(self, config: RegADConfig | None = None, backbone=None, name: str = "regad", seed: int = 0,
                 images=None, train_images=None):
        from .model import load_networks

        self.config = c = config or RegADConfig()
        self.backbone, self.name, self.seed = backbone, name, int(seed)
        self.images, self.train_images = images, train_images
        if c.k_shot < 1 or not c.checkpoint:
            raise ValueError("regad needs k_shot >= 1 and option 'checkpoint' (the network trained on the other "
                             "categories: rule train_fewshot)")
        if backbone is None:
            raise ValueError("regad needs its backbone (resnet18: the grid of the stored maps): pass --backbone")
        self.device = _resolve_device(c.device)
        nets, meta, trained = load_networks(c.checkpoint, backbone)
        self.net = nets["STN"].to(self.device).eval()
        self.size = int(trained["image_size"])
        self.last_info = {"map_level": MAP_LEVEL, "map_size": self.size, "k_shot": c.k_shot,
                          "checkpoint": str(c.checkpoint), "trained_on": meta.get("trained_on"),
                          "normalisation": "min-max over the category"}

    def coarse(self, feats):
        from .. import CoarseResult
        from ..shots import augment_regad

        c = self.config
        if self.images is None or self.train_images is None:
            raise ValueError("regad scores images and draws train/good shots: the coarse stage needs --data-root")
        shots = self.train_images.draw(c.k_shot, self.seed, "regad")
        self.last_info["shots"] = shots
        support = augment_regad(preprocess(self.train_images.load(shots), self.size))
        emb = torch.cat([embeddings(self.net, support[a : a + c.batch_size].to(self.device))
                         for a in range(0, len(support), c.batch_size)])
        grid = emb.shape[-2:]
        mean, prec = gaussian(emb.flatten(2), c.ridge, c.position_chunk)
        del emb
        n, maps = len(feats.ids), []
        for a in progress(range(0, n, c.batch_size), desc="regad", unit="batch"):
            x = preprocess(self.images(list(range(a, min(n, a + c.batch_size)))), self.size).to(self.device)
            dist = mahalanobis(embeddings(self.net, x).flatten(2), mean, prec, c.position_chunk)
            up = F.interpolate(dist.reshape(-1, 1, *grid), size=(self.size, self.size), mode="bilinear",
                               align_corners=False)[:, 0]
            maps.append(gaussian_smooth(up.float().cpu(), c.sigma))
        full = minmax(torch.cat(maps))
        LOG.info("regad: %d images, %d shots x 22 views, Gaussian of %d channels on %dx%d (%s)", n, c.k_shot,
                 mean.shape[0], *grid, MAP_LEVEL)
        return CoarseResult(maps=patch_map(full, self.backbone.grid).numpy().astype(np.float32),
                            scores=full.amax(dim=(-2, -1)).numpy().astype(np.float32))

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude):
        raise NotImplementedError("regad scores images with its own registration network, so PGT cannot score "
                                  "pseudo-anomalies from cached tokens; refine another backend's maps")
