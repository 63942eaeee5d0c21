"""RareCLIP's online rarity memory, as vectorised tensor functions (specs/backends.md section 3).

Facts from the official code state ``hy28hy/RareCLIP_v1@a8e6d46`` (``rareclip.py``: ``LS``, ``SCS``,
``segment_and_update``, ``process_image_and_update``), re-implemented here:

* :func:`aggregate`: r = 1 the raw tokens, r = 3 the 3x3 neighbourhood mean with replicate padding;
  then L2 normalisation (one memory bank per (r, layer));
* :func:`loose_similarity` ("LS", ``LS_ratio`` 0.01): divide by the k-th smallest value,
  k = int(n * (1 - ratio)) (the 99th percentile as ``torch.kthvalue``), clip at 1;
* :func:`rarity`: per patch the top-k (3) prototype similarities, LS, ``ref_prob[s, i] =
  mean_k(sim_ik * PSM[s, idx_ik])``, estimate = mean of the top ceil(0.3 * S) rows, map = 1 - estimate;
* :class:`RarityBank`: PFM (prototypes ``[M, C]``) and PSM (``[S, M]``); update appends the image's
  features, a PSM row (LS of each prototype's max similarity to the new patches) and the new columns
  ``[ref_prob; 1]``; SCS sampling (:func:`scs_keep`) when M > 3 * patches; PSM rows above 200 drop the
  oldest;
* :func:`gaussian_blur` (torchvision's ``gaussian_blur``, as ``GaussianBlur``),
  :func:`rescore` (kNN re-scoring of the image score).

Memory is O(prototypes x patches): the similarity of the new image's patches to the prototypes is
computed in chunks of patches (top-k kept per chunk), and SCS's strict-lower-triangle maximum in chunks
of prototype rows; nothing of size prototypes x prototypes is ever held.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK = 2048  # rows per similarity block (bounds memory at CHUNK x prototypes; results do not depend on it)


def aggregate(tokens: torch.Tensor, r: int) -> torch.Tensor:
    """``[h, w, C]`` raw tokens -> L2-normalised ``[h*w, C]``: r = 1 as is, r = 3 the 3x3 mean with
    replicate padding (the official unfold of replicate-padded patch indices, averaged)."""
    h, w, c = tokens.shape
    if r == 1:
        flat = tokens.reshape(h * w, c)
    elif r >= 3 and r % 2 == 1:
        x = tokens.permute(2, 0, 1).unsqueeze(0)
        x = F.pad(x, (r // 2,) * 4, mode="replicate")
        flat = F.avg_pool2d(x, r, stride=1).squeeze(0).permute(1, 2, 0).reshape(h * w, c)
    else:
        raise ValueError(f"rareclip: neighbourhood size r={r} must be 1 or an odd number >= 3")
    return F.normalize(flat, dim=-1)


def loose_similarity(sims: torch.Tensor, ratio: float = 0.01) -> torch.Tensor:
    """``LS``: divide by the ``int(n * (1 - ratio))``-th smallest value (at least the 1st), clip at 1.

    ``ratio == 0`` divides by the maximum (the official branch for ``LS_ratio`` 0)."""
    flat = sims.reshape(-1)
    if ratio > 0:
        k = max(1, int(flat.numel() * (1 - ratio)))
        ref = torch.kthvalue(flat, k).values
    else:
        ref = flat.max()
    return (sims / ref).clamp(max=1.0)


def _topk_rows(feats: torch.Tensor, pfm: torch.Tensor, k: int, chunk: int):
    """Per row of ``feats`` the top-k similarities to ``pfm`` (and indices), and per prototype the max
    similarity to any row of ``feats``; in chunks of rows."""
    vals, idx = [], []
    col_max = torch.full((pfm.shape[0],), -math.inf, dtype=feats.dtype, device=feats.device)
    for a in range(0, feats.shape[0], chunk):
        s = feats[a : a + chunk] @ pfm.T
        v, i = torch.topk(s, min(k, pfm.shape[0]), dim=1)
        vals.append(v)
        idx.append(i)
        col_max = torch.maximum(col_max, s.max(dim=0).values)
    return torch.cat(vals), torch.cat(idx), col_max


def rarity(feats: torch.Tensor, pfm: torch.Tensor, psm: torch.Tensor, topk: int = 3, ls_ratio: float = 0.01,
           rare_thd: float = 0.3, chunk: int = CHUNK):
    """Rarity of the patches ``feats [L, C]`` against the bank (``segment_and_update``, reading part).

    Returns ``(rare_map [L], ref_prob [S, L], ref_sim [M], (max, argmax))``: ``1 - estimate``, the
    per-row probabilities (the new PSM columns), the LS of each prototype's max similarity (the new PSM
    row), and each patch's most similar prototype (kept by :class:`RarityBank` for SCS).
    """
    top_sim, top_idx, col_max = _topk_rows(feats, pfm, topk, chunk)
    nearest = (top_sim[:, 0].clone(), top_idx[:, 0].clone())  # each patch's max similarity (SCS cache)
    top_sim = loose_similarity(top_sim, ls_ratio)
    ref_prob = (top_sim.unsqueeze(0) * psm[:, top_idx]).mean(dim=-1)  # [S, L]
    k = int(math.ceil(ref_prob.shape[0] * rare_thd))
    estimate = torch.topk(ref_prob, max(1, k), dim=0).values.mean(0)
    return 1 - estimate, ref_prob, loose_similarity(col_max, ls_ratio), nearest


def _earlier_max(rows: torch.Tensor, row_ids: torch.Tensor, pfm: torch.Tensor, chunk: int):
    """Per row (at position ``row_ids`` of ``pfm``) the max similarity to the prototypes before it and
    its index (-inf / -1 for the first prototype)."""
    best = torch.full((rows.shape[0],), -math.inf, dtype=rows.dtype, device=rows.device)
    arg = torch.full((rows.shape[0],), -1, dtype=torch.long, device=rows.device)
    for a in range(0, rows.shape[0], chunk):
        ids = row_ids[a : a + chunk]
        top = int(ids.max()) if ids.numel() else 0
        if top == 0:
            continue
        s = rows[a : a + chunk] @ pfm[:top].T
        col = torch.arange(top, device=rows.device).unsqueeze(0)
        s = torch.where(col < ids.unsqueeze(1), s, torch.full((), -math.inf, dtype=s.dtype, device=s.device))
        v, i = s.max(dim=1)
        has = ids > 0
        best[a : a + chunk] = torch.where(has, v, best[a : a + chunk])
        arg[a : a + chunk] = torch.where(has, i, arg[a : a + chunk])
    return best, arg


def scs_keep(pfm: torch.Tensor, keep: int, chunk: int = CHUNK) -> torch.Tensor:
    """Sequential coreset sampling: indices (ascending) of the ``keep`` prototypes whose maximum
    similarity to any *earlier* prototype is smallest. As the official ``tril(F F^T, -1).max(-1)``,
    entries on and above the diagonal count as 0 (so the maximum is at least 0; the first is 0)."""
    m = pfm.shape[0]
    score = torch.empty(m, dtype=pfm.dtype, device=pfm.device)
    for a in range(0, m, chunk):
        b = min(m, a + chunk)
        s = pfm[a:b] @ pfm[:b].T  # only the columns that can be earlier than the rows
        col = torch.arange(b, device=pfm.device).unsqueeze(0)
        row = torch.arange(a, b, device=pfm.device).unsqueeze(1)
        score[a:b] = torch.where(col < row, s, torch.zeros((), dtype=s.dtype, device=s.device)).max(dim=1).values
    idx = torch.topk(score, keep, largest=False).indices
    return torch.sort(idx).values


class RarityBank:
    """One (r, layer) memory: PFM ``[M, C]`` and PSM ``[S, M]`` (``segment_and_update`` + ``SCS``).

    SCS needs every prototype's maximum similarity to the earlier ones. The bank keeps it (and its
    argmax) per prototype instead of recomputing the triangle of ``PFM PFM^T`` at every image: new
    patches get it from the scoring's top-1 (old prototypes) and a ``[L, L]`` block (earlier new
    patches); after sampling, only the prototypes whose argmax was dropped are recomputed (a maximum
    over a subset holding the argmax is unchanged). Same selection as :func:`scs_keep`, O(M) extra memory.
    """

    def __init__(self, keep_prototypes: int, keep_rows: int = 200, topk: int = 3, ls_ratio: float = 0.01,
                 rare_thd: float = 0.3, chunk: int = CHUNK):
        self.keep_prototypes, self.keep_rows = int(keep_prototypes), int(keep_rows)
        self.topk, self.ls_ratio, self.rare_thd, self.chunk = int(topk), float(ls_ratio), float(rare_thd), int(chunk)
        self.pfm: torch.Tensor | None = None
        self.psm: torch.Tensor | None = None
        self.earlier: torch.Tensor | None = None  # per prototype: max similarity to earlier ones (-inf: none)
        self.earlier_arg: torch.Tensor | None = None  # its index (-1: none)

    @property
    def empty(self) -> bool:
        return self.pfm is None

    def score(self, feats: torch.Tensor):
        """``(rare_map [L], ref_prob, ref_sim)`` of normalised patches, or None while the bank is empty."""
        if self.pfm is None:
            return None
        return rarity(feats, self.pfm, self.psm, self.topk, self.ls_ratio, self.rare_thd, self.chunk)

    def update(self, feats: torch.Tensor, scored=None) -> None:
        """Append the image (``scored``: this image's :meth:`score`), then SCS and the PSM row limit."""
        n = feats.shape[0]
        ones = torch.ones((1, n), dtype=feats.dtype, device=feats.device)
        if self.pfm is None:
            m0 = 0
            self.pfm, self.psm = feats.clone(), ones
            self.earlier = torch.empty(0, dtype=feats.dtype, device=feats.device)
            self.earlier_arg = torch.empty(0, dtype=torch.long, device=feats.device)
            old_best = torch.full((n,), -math.inf, dtype=feats.dtype, device=feats.device)
            old_arg = torch.full((n,), -1, dtype=torch.long, device=feats.device)
        else:
            if scored is None:
                scored = self.score(feats)
            _, ref_prob, ref_sim, (old_best, old_arg) = scored
            m0 = self.pfm.shape[0]
            self.pfm = torch.cat([self.pfm, feats])
            self.psm = torch.cat([torch.cat([self.psm, ref_sim.unsqueeze(0)]), torch.cat([ref_prob, ones])], dim=1)
        # the new patches: the earlier new patches (strict lower triangle of the [n, n] block)
        ids = torch.arange(n, device=feats.device)
        new_best, new_arg = _earlier_max(feats, ids, feats, self.chunk)
        take = new_best > old_best
        self.earlier = torch.cat([self.earlier, torch.where(take, new_best, old_best)])
        self.earlier_arg = torch.cat([self.earlier_arg, torch.where(take, new_arg + m0, old_arg)])
        if self.pfm.shape[0] > self.keep_prototypes:
            self._sample()
        if self.psm.shape[0] > self.keep_rows:
            self.psm = self.psm[1:].contiguous()

    def _sample(self) -> None:
        m = self.pfm.shape[0]
        keep = torch.sort(torch.topk(self.earlier.clamp(min=0), self.keep_prototypes, largest=False).indices).values
        new_index = torch.full((m,), -1, dtype=torch.long, device=keep.device)
        new_index[keep] = torch.arange(keep.numel(), device=keep.device)
        self.pfm = self.pfm[keep].contiguous()
        self.psm = self.psm[:, keep].contiguous()
        arg = self.earlier_arg[keep]
        self.earlier = self.earlier[keep]
        self.earlier_arg = torch.where(arg >= 0, new_index[arg.clamp(min=0)], arg)
        stale = torch.nonzero((arg >= 0) & (self.earlier_arg < 0)).squeeze(1)  # argmax dropped
        if stale.numel():
            best, barg = _earlier_max(self.pfm[stale], stale, self.pfm, self.chunk)
            self.earlier[stale], self.earlier_arg[stale] = best, barg


def stream_weights(position: int, early: int = 3) -> tuple[float, float]:
    """``(rare weight, text weight)`` of the image at ``position`` of a class stream (0-based):
    text only first, 2/3 + 2/3 up to position ``early``, then 4/3 rare + 1/3 text."""
    if position <= 0:
        return 0.0, 1.0
    if position <= early:
        return 2.0 / 3.0, 2.0 / 3.0
    return 4.0 / 3.0, 1.0 / 3.0


def gaussian_blur(maps: torch.Tensor, kernel_size: int = 25, sigma: float = 4.0) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` (what RareCLIP's ``GaussianBlur`` runs) on ``[N, H, W]`` maps, with the
    sizes checked first (torchvision's reflect padding needs the kernel's half-width below the map size)."""
    from ..._compat import import_torchvision

    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"rareclip: blur kernel size must be odd and positive, got {kernel_size}")
    if kernel_size // 2 >= min(maps.shape[-2:]):
        raise ValueError(f"rareclip: blur kernel {kernel_size} is too large for {tuple(maps.shape[-2:])} maps")
    blur = import_torchvision().transforms.functional.gaussian_blur
    return blur(maps.unsqueeze(1), [kernel_size, kernel_size], [float(sigma), float(sigma)]).squeeze(1)


def rescore(sim: torch.Tensor, scores: torch.Tensor, freq: int = 20, temperature: float = 200.0,
            max_neighbours: int = 9) -> torch.Tensor:
    """Image re-scoring (``Rs``): ``sim [n]`` to the images seen (self last, included), raw ``scores [n]``.

    With n > ``freq``: divide by the max, take the min(ceil(n / freq), max_neighbours) most similar,
    return ``sum softmax(temperature * sim) * scores``; otherwise the image's own raw score."""
    n = sim.shape[0]
    if n <= freq:
        return scores[-1]
    k = min(int(math.ceil(n / freq)), int(max_neighbours))
    s = sim / sim.max()
    top, idx = torch.topk(s, k)
    return (torch.softmax(temperature * top, dim=0) * scores[idx]).sum()
