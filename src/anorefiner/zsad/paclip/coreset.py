"""Approximate greedy coreset sampling (PatchCore, Roth et al. 2022), used by PA-CLIP's memory banks.

"Approximate": distances are measured in a seeded random projection of the features to
``proj_dim`` dimensions (Johnson-Lindenstrauss), and each step adds the point farthest from the
current coreset (k-center greedy), starting from a seeded random point.
"""

from __future__ import annotations

import math

import torch


def greedy_coreset(x: torch.Tensor, ratio: float, seed: int, proj_dim: int = 128) -> torch.Tensor:
    """Indices (sorted, int64) of ``ceil(ratio * M)`` rows of ``x`` ``[M, C]`` chosen by k-center greedy.

    ``ratio >= 1`` keeps every row. Same ``seed`` -> same indices.
    """
    m = x.shape[0]
    if not 0 < ratio:
        raise ValueError(f"coreset ratio must be > 0, got {ratio}")
    if ratio >= 1 or m <= 1:
        return torch.arange(m, device=x.device)
    n_keep = max(1, math.ceil(ratio * m))
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x = x.float()
    if x.shape[1] > proj_dim:
        proj = torch.randn(x.shape[1], proj_dim, generator=gen) / math.sqrt(proj_dim)
        x = x @ proj.to(x.device)
    start = int(torch.randint(m, (1,), generator=gen))
    chosen = torch.empty(n_keep, dtype=torch.long)
    chosen[0] = start
    min_d = ((x - x[start]) ** 2).sum(1)
    for i in range(1, n_keep):
        nxt = int(torch.argmax(min_d))
        chosen[i] = nxt
        min_d = torch.minimum(min_d, ((x - x[nxt]) ** 2).sum(1))
    return torch.sort(chosen).values.to(x.device)
