"""MuSc: zero-shot anomaly maps by mutual scoring of the unlabeled test images (Li et al., ICLR 2024).

Re-implemented from the facts in ``shared/specs/methods.md`` (MuSc section):

* **LNAMD** (per layer, per aggregation degree r in {1, 3, 5}): LayerNorm of each image's token
  grid over ``[C, H, W]`` together (eps 1e-5, no affine), then the per-channel mean over the
  r x r window with zero padding ``(r-1)/2`` *counted* (``avg_pool2d(count_include_pad=True)``),
  then (reference ``models/musc.py``, right after ``LNAMD._embed``) an L2 normalisation of each
  token (option ``l2_normalize``; see the note below).
* **MSM** (per layer): for each patch of image i and every other image j, the minimum Euclidean
  distance to j's patches (N-1 values); the patch score is the mean of the
  ``k = int((N-1) * topmin)`` smallest of them. Maps are averaged over layers, then over r.
* Image score = max of the patch map, then **RsCIN** (:mod:`.rscin`) with the CLS token.

Note on ``l2_normalize``: methods.md says "no L2 normalisation (verified in _LNAMD.py)"; that
is true of ``_LNAMD.py``, but the caller ``models/musc.py`` divides the LNAMD output by its norm
before MSM (``features /= features.norm(dim=-1, keepdim=True)``). The default follows the
reference pipeline; ``l2_normalize=False`` gives the methods.md reading.

Small sets: with fewer than 5 images ``int((N-1) * 0.3)`` is 0 and the mean is undefined. We use
the documented fallback ``k = max(1, int((N-1) * topmin))`` (so every set of >= 2 images is
scorable, e.g. a small last PGT group); a single image raises ``ValueError``.

Distances are computed in (query-image x reference-image) blocks with the
``||a||^2 + ||b||^2 - 2ab`` expansion in float32 (clamped at 0), so peak memory is bounded by the
``chunk`` option (elements of one block of squared distances), on CPU or CUDA (the device of the
tokens). Within one image set (:func:`msm`) each block serves both directions of the symmetric
distance, so only half of the image pairs are multiplied.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...log import LOG, progress
from ..groups import make_groups
from ..maps import resolve_device as _resolve_device
from .rscin import rscin

# 2**25 float32 = 128 MiB per distance block: small enough for 8 GiB hosts, large enough that
# the matrix products stay efficient (a 37x37 query image against ~20 reference images per block).
DEFAULT_CHUNK = 2**25


def effective_k(n_ref: int, topmin: float) -> int:
    """Number of smallest per-image distances averaged: ``max(1, int(n_ref * topmin))``."""
    if n_ref < 1:
        raise ValueError(
            f"MuSc needs at least one reference image per query, got {n_ref} "
            "(a category or group with a single image cannot be mutually scored)"
        )
    return max(1, int(n_ref * topmin))


def lnamd(x: torch.Tensor, r: int, l2_normalize: bool = True) -> torch.Tensor:
    """LNAMD of one layer: ``[N, h, w, C]`` -> ``[N, h, w, C]`` float32 (see module docstring)."""
    if r < 1 or r % 2 == 0:
        raise ValueError(f"LNAMD aggregation degree r must be odd and >= 1, got r={r}")
    y = x.float().permute(0, 3, 1, 2)
    y = F.layer_norm(y, y.shape[1:], eps=1e-5)
    if r > 1:
        y = F.avg_pool2d(y, r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
    y = y.permute(0, 2, 3, 1).contiguous()
    if l2_normalize:
        y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return y


def _lnamd_chunked(x, r: int, l2_normalize: bool, device, batch: int = 16) -> torch.Tensor:
    """LNAMD image by image batch (LN is per image, so batching changes nothing)."""
    out = []
    for s in range(0, x.shape[0], batch):
        xb = torch.as_tensor(np.asarray(x[s : s + batch]) if not torch.is_tensor(x) else x[s : s + batch])
        out.append(lnamd(xb.to(device), r, l2_normalize))
    return torch.cat(out, 0)


def _sq_dist(q: torch.Tensor, q_sq: torch.Tensor, r: torch.Tensor, r_sq: torch.Tensor) -> torch.Tensor:
    """Squared distances ``||q||^2 + ||r||^2 - 2 q r^T`` of ``q`` ``[a, C]`` (norms ``q_sq`` ``[a, 1]``)
    to ``r`` ``[b, C]`` (norms ``r_sq``, any shape of ``b`` elements) -> ``[a, b]``; may dip below 0."""
    return torch.addmm(q_sq + r_sq.reshape(1, -1), q, r.T, beta=1.0, alpha=-2.0)


def min_dist_to_images(q: torch.Tensor, ref: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """For each patch of each query image, the min Euclidean distance to each reference image.

    ``q``: ``[M, L, C]``, ``ref``: ``[R, L', C]`` (same device). Returns ``[M, L, R]`` float32.
    Memory per step: ``bq * L * br * L'`` float32 with ``bq * br`` chosen from ``chunk``.
    """
    m, L, c = q.shape
    n_ref, L2, _ = ref.shape
    per_pair = L * L2
    pairs = max(1, chunk // per_pair)
    bq = max(1, min(m, int(math.sqrt(pairs))))
    br = max(1, min(n_ref, pairs // bq))
    q_sq = (q * q).sum(-1)  # [M, L]
    r_sq = (ref * ref).sum(-1)  # [R, L']
    out = torch.empty((m, L, n_ref), dtype=torch.float32, device=q.device)
    for qs in range(0, m, bq):
        qb = q[qs : qs + bq].reshape(-1, c)
        qn = q_sq[qs : qs + bq].reshape(-1, 1)
        nq = qb.shape[0] // L
        for rs in range(0, n_ref, br):
            rb = ref[rs : rs + br].reshape(-1, c)
            d2 = _sq_dist(qb, qn, rb, r_sq[rs : rs + br])
            nr = rb.shape[0] // L2
            d2 = d2.view(nq, L, nr, L2).amin(-1)
            out[qs : qs + nq, :, rs : rs + nr] = d2.clamp_min_(0.0).sqrt_()
    return out


def _mean_k_smallest(d: torch.Tensor, valid: torch.Tensor, topmin: float) -> torch.Tensor:
    """``d``: ``[M, L, R]`` distances, ``valid``: ``[M, R]`` bool. Mean of each query's k smallest
    valid values, ``k = effective_k(#valid, topmin)`` (may differ per query)."""
    n_valid = valid.sum(1)
    ks = [effective_k(int(n), topmin) for n in n_valid.tolist()]
    d = d.masked_fill(~valid[:, None, :], float("inf"))
    kmax = max(ks)
    small = torch.topk(d, kmax, dim=-1, largest=False, sorted=True).values  # [M, L, kmax]
    k_t = torch.tensor(ks, device=d.device, dtype=torch.long)
    keep = torch.arange(kmax, device=d.device)[None, :] < k_t[:, None]  # [M, kmax]
    small = torch.where(keep[:, None, :], small, torch.zeros_like(small))
    return small.sum(-1) / k_t[:, None].to(small.dtype)


def pairwise_min_dist(z: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """All-pairs version of :func:`min_dist_to_images` for one image set: ``[N, L, C]`` -> ``[N, L, N]``.

    The Euclidean distance is symmetric, so one block of squared distances between images ``A`` and
    ``B`` gives both directions: its min over ``B``'s patches scores ``A`` against ``B`` and its min
    over ``A``'s patches scores ``B`` against ``A``. Only blocks with ``B >= A`` are computed, which
    halves the matrix products. The diagonal ``[i, :, i]`` (an image against itself) is filled too;
    callers mask it.
    """
    n, L, c = z.shape
    b = max(1, min(n, int(math.sqrt(max(1, chunk // (L * L))))))
    sq = (z * z).sum(-1)  # [N, L]
    out = torch.empty((n, L, n), dtype=torch.float32, device=z.device)
    for a0 in range(0, n, b):
        a1 = min(n, a0 + b)
        qa = z[a0:a1].reshape(-1, c)
        qn = sq[a0:a1].reshape(-1, 1)
        for b0 in range(a0, n, b):
            b1 = min(n, b0 + b)
            d2 = _sq_dist(qa, qn, z[b0:b1].reshape(-1, c), sq[b0:b1])
            d2 = d2.view(a1 - a0, L, b1 - b0, L)
            out[a0:a1, :, b0:b1] = d2.amin(-1)
            if b0 != a0:
                out[b0:b1, :, a0:a1] = d2.amin(1).permute(1, 2, 0)
    return out.clamp_min_(0.0).sqrt_()


def msm(z: torch.Tensor, topmin: float = 0.3, chunk: int = DEFAULT_CHUNK, query_block: int = 8) -> torch.Tensor:
    """Mutual scoring of one layer: ``z`` ``[N, L, C]`` -> patch scores ``[N, L]``.

    Distances come from :func:`pairwise_min_dist` (``N*L*N`` float32, 220 MB for 200 images of 37x37
    patches); the k-smallest means run ``query_block`` images at a time.
    """
    n = z.shape[0]
    effective_k(n - 1, topmin)
    d_all = pairwise_min_dist(z, chunk)
    out = torch.empty((n, z.shape[1]), dtype=torch.float32, device=z.device)
    for s in range(0, n, query_block):
        e = min(n, s + query_block)
        valid = torch.ones((e - s, n), dtype=torch.bool, device=z.device)
        valid[torch.arange(e - s), torch.arange(s, e)] = False  # an image never scores itself
        out[s:e] = _mean_k_smallest(d_all[s:e], valid, topmin)
    return out


def score(tokens, r_list=(1, 3, 5), topmin: float = 0.3, *, l2_normalize: bool = True,
          chunk: int = DEFAULT_CHUNK, device=None) -> torch.Tensor:
    """MuSc patch-level maps ``[N, h, w]`` (before upsampling) of one category's images.

    ``tokens`` maps layer name -> ``[N, h, w, C]`` patch tokens (Tensor or ndarray); computation
    runs on ``device`` (default: the device of the first tensor). Maps are averaged over the
    layers, then over ``r_list``.
    """
    if not tokens:
        raise ValueError("MuSc: no layers given (tokens is empty)")
    shapes = {name: tuple(t.shape) for name, t in tokens.items()}
    first = next(iter(tokens.values()))
    n, h, w = first.shape[:3]
    for name, shp in shapes.items():
        if len(shp) != 4 or shp[:3] != (n, h, w):
            raise ValueError(f"MuSc: layer {name!r} has shape {shp}, expected [{n}, {h}, {w}, C]")
    if device is None:
        device = first.device if torch.is_tensor(first) else torch.device("cpu")
    total = torch.zeros((n, h * w), dtype=torch.float32, device=device)
    for r in r_list:
        per_r = torch.zeros_like(total)
        for name, x in tokens.items():
            z = _lnamd_chunked(x, int(r), l2_normalize, device).reshape(n, h * w, -1)
            per_r += msm(z, topmin, chunk)
            del z
        total += per_r / len(tokens)
    return (total / len(r_list)).reshape(n, h, w)


def score_queries(query_tokens, ref_tokens, exclude=None, r_list=(1, 3, 5), topmin: float = 0.3, *,
                  l2_normalize: bool = True, chunk: int = DEFAULT_CHUNK, device=None) -> torch.Tensor:
    """Maps ``[M, h, w]`` of new images scored against reference images (same LNAMD).

    ``query_tokens``/``ref_tokens``: layer -> ``[M|R, h, w, C]``; ``exclude[m]`` is the position
    (in ``ref_tokens``) of the reference left out for query m, or None. Per query patch and
    reference image the min distance; mean of the ``effective_k(#references)`` smallest.
    """
    names = list(query_tokens)
    if set(names) != set(ref_tokens):
        raise ValueError(f"score_queries: query layers {sorted(names)} != reference layers {sorted(ref_tokens)}")
    first = query_tokens[names[0]]
    m, h, w = first.shape[:3]
    n_ref = next(iter(ref_tokens.values())).shape[0]
    if device is None:
        device = first.device if torch.is_tensor(first) else torch.device("cpu")
    exclude = [None] * m if exclude is None else list(exclude)
    if len(exclude) != m:
        raise ValueError(f"score_queries: exclude has {len(exclude)} entries for {m} queries")
    valid = torch.ones((m, n_ref), dtype=torch.bool, device=device)
    for i, e in enumerate(exclude):
        if e is not None:
            if not 0 <= int(e) < n_ref:
                raise ValueError(f"score_queries: exclude[{i}]={e} is outside 0..{n_ref - 1}")
            valid[i, int(e)] = False
    total = torch.zeros((m, h * w), dtype=torch.float32, device=device)
    for r in r_list:
        for name in names:
            q = _lnamd_chunked(query_tokens[name], int(r), l2_normalize, device).reshape(m, h * w, -1)
            ref = _lnamd_chunked(ref_tokens[name], int(r), l2_normalize, device)
            ref = ref.reshape(n_ref, -1, ref.shape[-1])
            total += _mean_k_smallest(min_dist_to_images(q, ref, chunk), valid, topmin) / len(names)
    return (total / len(r_list)).reshape(m, h, w)


# RsCIN k lists of the reference implementation (models/musc.py), per dataset.
RSCIN_K_LISTS = {"mvtec_ad": (1, 2, 3), "visa": (1, 8, 9)}


@dataclass
class MuscConfig:
    """Options of the ``musc``, ``musc_star`` and ``musc_cnn`` backends (config ``backends.<name>.options``)."""

    r_list: tuple = (1, 3, 5)  # MuSc paper / methods.md
    topmin: float = 0.3  # MuSc paper: mean of the 30% smallest per-image distances
    l2_normalize: bool = True  # reference models/musc.py normalises LNAMD output (see module doc)
    layers: tuple | None = None  # None: every layer of the feature cache (6/12/18/24 for ViT-L)
    group_size: int | None = None  # None = whole test set (musc); 30 = MuSc* (AnoRefiner Table 1)
    # Same default as PGTConfig.group_order so MuSc* scores exactly PGT's groups (same seed): the
    # index order puts one defect type per group on MVTec (bottle's first group has no good image).
    group_order: str = "shuffled"
    rscin: bool = True  # False for CNN features (AnoRefiner supplement B: RsCIN needs a CLS token)
    k_list: tuple | None = None  # None: RSCIN_K_LISTS[dataset] (MVTec [1,2,3], VisA [1,8,9])
    rscin_scope: str = "group"  # MuSc*: re-score within each group (a group is all one sees online)
    dataset: str = "mvtec_ad"  # picks the default k_list; the coarse command passes --dataset
    chunk: int = DEFAULT_CHUNK  # elements per distance block: bounds memory
    device: str = "auto"  # "auto" = cuda when available


def _warn_unofficial_resize(attrs: dict, name: str) -> None:
    """Say so when a ViT cache's position embedding was not resized as MuSc's official code does (plain bicubic,
    :attr:`~anorefiner.zsad.registry.BackendType.pos_embed`): its maps then differ from the official ones."""
    from ...backbones.clip_vit import pos_embed_mode
    from ..registry import BACKEND_TYPES

    got, official = pos_embed_mode(attrs.get("pos_embed")), BACKEND_TYPES["musc"].pos_embed
    if got is not None and got != official:
        LOG.warning("%s: the features' position embedding was resized with %r, MuSc's official code uses %r "
                    "(backbones.<key>.pos_embed; docs/fidelity.md)", name, got, official)


class MuscBackend:
    """The MuSc family as a :class:`~anorefiner.zsad.Backend` (``coarse`` + ``score_queries``)."""

    def __init__(self, config: MuscConfig | None = None, name: str = "musc", seed: int = 0, backbone=None):
        self.config = config or MuscConfig()
        self.backbone = backbone
        self.name = name
        self.seed = seed
        c = self.config
        if c.group_order not in ("index", "shuffled"):
            raise ValueError(f"musc option group_order must be 'index' or 'shuffled', got {c.group_order!r}")
        if c.rscin_scope not in ("group", "all"):
            raise ValueError(f"musc option rscin_scope must be 'group' or 'all', got {c.rscin_scope!r}")
        self.device = _resolve_device(c.device)

    def _layers(self, feats) -> dict:
        names = list(self.config.layers) if self.config.layers else list(feats.layers)
        missing = [n for n in names if n not in feats.layers]
        if missing:
            raise ValueError(f"musc: layers {missing} not in the feature cache (has {list(feats.layers)})")
        return {n: feats.layers[n] for n in names}

    def k_list(self) -> tuple:
        if self.config.k_list is not None:
            return tuple(self.config.k_list)
        return RSCIN_K_LISTS.get(self.config.dataset, RSCIN_K_LISTS["mvtec_ad"])

    def groups(self, n: int) -> list[np.ndarray]:
        seed = self.seed if self.config.group_order == "shuffled" else None
        return make_groups(n, self.config.group_size, seed=seed)

    def coarse(self, feats):
        from .. import CoarseResult

        c = self.config
        layers = self._layers(feats)
        _warn_unofficial_resize(feats.attrs, self.name)
        n = len(feats.ids)
        maps = np.zeros((n,) + next(iter(layers.values())).shape[1:3], dtype=np.float32)
        groups = self.groups(n)
        LOG.info("%s: scoring %d images in %d group(s) on %s (layers %s, r %s)", self.name, n, len(groups),
                 self.device, list(layers), list(c.r_list))
        start = time.perf_counter()
        for gi, g in enumerate(progress(groups, desc=f"{self.name} groups", unit="group")):
            # the whole set is passed without a copy (fancy indexing would duplicate every layer)
            sub = {k: torch.as_tensor(v if len(g) == n else v[g]) for k, v in layers.items()}
            maps[g] = score(sub, c.r_list, c.topmin, l2_normalize=c.l2_normalize, chunk=c.chunk,
                            device=self.device).cpu().numpy()
            LOG.info("%s: group %d/%d (%d images) scored, %.1f s elapsed", self.name, gi + 1, len(groups), len(g),
                     time.perf_counter() - start)
        raw = maps.reshape(n, -1).max(1)
        scores = raw.astype(np.float32)
        if c.rscin and feats.cls is None:
            LOG.warning("musc: the feature cache has no CLS token: RsCIN is skipped (image score = max of map)")
        elif c.rscin:
            scopes = groups if c.rscin_scope == "group" else [np.arange(n)]
            cls = self.cls_embeddings(feats.cls)
            for g in scopes:
                scores[g] = rscin(raw[g], cls[g], self.k_list())
        return CoarseResult(maps=maps, scores=scores.astype(np.float32))

    def cls_embeddings(self, cls) -> np.ndarray:
        """RsCIN's image embeddings: the reference uses CLIP's projected image embedding
        (ln_post + proj of the class token); the cache holds the raw class token, so map it through
        the backbone when one is given, else use the raw token (cosine of a different space)."""
        cls = np.asarray(cls, dtype=np.float32)
        if self.backbone is not None:
            try:
                return np.asarray(self.backbone.image_embedding(torch.as_tensor(cls)).float().cpu())
            except (TypeError, NotImplementedError, AttributeError):
                pass
        LOG.info("musc: RsCIN on the raw class token (no CLIP backbone given for its image embedding)")
        return cls

    def reference_indices(self, n: int, sources) -> np.ndarray:
        """The images this backend scored ``sources`` against: the union of their groups (MuSc: all n)."""
        groups = self.groups(n)
        return np.sort(np.concatenate([g for g in groups if np.isin(g, np.asarray(sources)).any()]))

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude):
        """Coarse maps of new images against ``feats`` images ``reference_idx`` (``exclude[m]``:
        index into ``feats`` of query m's source image, removed from its references)."""
        c = self.config
        names = list(c.layers) if c.layers else list(feats.layers)
        ref_idx = np.asarray(reference_idx, dtype=np.int64)
        pos = {int(j): p for p, j in enumerate(ref_idx)}
        excl = [None if e is None or int(e) not in pos else pos[int(e)] for e in exclude]
        refs = {k: torch.as_tensor(np.ascontiguousarray(feats.layers[k][ref_idx])) for k in names}
        queries = {k: torch.as_tensor(query_layers[k]) for k in names}
        return score_queries(queries, refs, excl, c.r_list, c.topmin, l2_normalize=c.l2_normalize,
                             chunk=c.chunk, device=self.device).cpu()
