"""RsCIN: re-scoring with constrained image-level neighbourhood (MuSc, Li et al. 2024, Sec. 3.4).

Re-implemented from the description of MuSc's ``models/modules/_RsCIN.py`` (facts only):

1. the raw image scores (max of each map) are min-max normalised over the scored set;
2. the similarity matrix ``W = c c^T`` of the L2-normalised CLS embeddings;
3. for each ``k`` in ``k_list``: every row of ``W`` keeps only its ``k`` largest entries (the image
   itself, similarity 1, is normally one of them), the rest set to 0; rows are normalised to sum
   to 1 (``D^-1 W_k``) and the scores are smoothed: ``s_k = D^-1 W_k s``;
4. the new score is the mean of the ``s_k`` over ``k_list``.

So with ``k = 1`` an image keeps its own score; larger ``k`` averages it with its most similar
images, which suppresses isolated false positives of normal images.
"""

from __future__ import annotations

import numpy as np
import torch


def rscin(scores, cls_tokens, k_list=(1, 2, 3)) -> np.ndarray:
    """Re-scored image scores ``[N]`` (float32) from raw ``scores`` ``[N]`` and ``cls_tokens`` ``[N, D]``.

    ``k_list`` containing 0 (the reference's "off" switch) or ``cls_tokens=None`` return the
    scores unchanged. ``k`` larger than N is clipped to N. A row whose kept similarities sum to
    <= 0 (possible only with non-CLIP embeddings) keeps its own normalised score.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if cls_tokens is None or not k_list or 0 in k_list:
        return s.astype(np.float32)
    c = torch.as_tensor(np.asarray(cls_tokens), dtype=torch.float64)
    if c.ndim != 2 or c.shape[0] != s.shape[0]:
        raise ValueError(f"rscin: cls_tokens shape {tuple(c.shape)} does not match {s.shape[0]} scores")
    n = s.shape[0]
    span = s.max() - s.min() if n else 0.0
    if n == 0 or span <= 0:
        return s.astype(np.float32)
    s_norm = torch.as_tensor((s - s.min()) / span)
    c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w = c @ c.T
    out = torch.zeros(n, dtype=torch.float64)
    for k in k_list:
        k = min(int(k), n)
        if k < 1:
            raise ValueError(f"rscin: k values must be >= 1, got {k} in k_list={list(k_list)}")
        idx = torch.topk(w, k, dim=1, largest=True).indices
        w_k = torch.zeros_like(w).scatter_(1, idx, w.gather(1, idx))
        row = w_k.sum(1)
        smoothed = (w_k @ s_norm) / row.clamp_min(1e-12)
        out += torch.where(row > 0, smoothed, s_norm)
    return (out / len(k_list)).numpy().astype(np.float32)
