"""WinCLIP speed: vectorised window passes and harmonic aggregation vs straightforward loops.

Workload (default): ``--n`` 2 images at 240 px through ``ViT-B-16-plus-240`` with random weights
(15x15 grid; 196 windows of 2x2 and 169 of 3x3). Baselines, in the same run:

* windows: one transformer call per window (all images of the batch in it), as a direct reading
  of WinCLIP's definition; ours: all windows of all images in one call (``zsad.winclip.backend``);
* harmonic aggregation: a Python loop over patches (anomalib ``utils.harmonic_aggregation``'s
  structure); ours: ``index_add``.

Prints the wall times, the ratios, and the largest absolute difference (must be <= 1e-5).

    python benchmarks/bench_winclip.py
    python benchmarks/bench_winclip.py --model anorefiner-tiny-clip --resolution 210   # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import time

import torch

from anorefiner.backbones import build_backbone
from anorefiner.zsad.winclip.backend import harmonic_aggregation, window_embeddings, window_indices


def loop_windows(bb, seq, windows):
    out = []
    for w in windows.tolist():
        idx = torch.tensor([0] + [1 + p for p in w])
        out.append(bb.encode_sequences(seq[:, idx]))
    return torch.stack(out, dim=1)


def loop_harmonic(scores, windows, grid):
    cols = []
    for p in range(grid[0] * grid[1]):
        cover = (windows == p).any(dim=1)
        cols.append(cover.sum() / (1.0 / scores[:, cover]).sum(dim=1))
    return torch.stack(cols, dim=1).reshape(scores.shape[0], *grid)


def timed(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16-plus-240")
    p.add_argument("--resolution", type=int, default=240)
    p.add_argument("--n", type=int, default=2, help="images per batch")
    p.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    bb = build_backbone(args.model, args.resolution, pretrained=None, seed=0, device=args.device)
    x = torch.randn(args.n, 3, args.resolution, args.resolution)
    seq = bb.embed(x)
    worst = 0.0
    fast_total = slow_total = 0.0
    for k in (2, 3):
        windows = window_indices(bb.grid, k)
        fast, t_fast = timed(lambda: window_embeddings(bb, seq, windows), args.repeat)
        slow, t_slow = timed(lambda: loop_windows(bb, seq, windows), 1)
        diff = float((fast - slow).abs().max())
        worst = max(worst, diff)
        fast_total, slow_total = fast_total + t_fast, slow_total + t_slow
        print(f"windows k={k}: {len(windows)} windows x {args.n} images: vectorised {t_fast:.3f} s, "
              f"per-window loop {t_slow:.3f} s, ratio {t_slow / t_fast:.1f}x, max |diff| {diff:.2e}")
        scores = torch.rand(args.n, len(windows)) + 0.01
        h_fast, th_fast = timed(lambda: harmonic_aggregation(scores, windows, bb.grid), max(args.repeat, 5))
        h_slow, th_slow = timed(lambda: loop_harmonic(scores, windows, bb.grid), 1)
        hdiff = float((h_fast - h_slow).abs().max())
        worst = max(worst, hdiff)
        print(f"harmonic k={k}: index_add {th_fast * 1e3:.2f} ms, per-patch loop {th_slow * 1e3:.2f} ms, "
              f"ratio {th_slow / th_fast:.1f}x, max |diff| {hdiff:.2e}")
    print(f"window passes total: ratio {slow_total / fast_total:.1f}x; worst |diff| {worst:.2e} "
          f"({'OK' if worst <= 1e-5 else 'FAIL'}: tolerance 1e-5)")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
