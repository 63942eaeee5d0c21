"""Benchmark of anorefiner.metrics against named baselines (run by hand, not a test).

  python benchmarks/bench_metrics.py            # 200 maps of 518x518 (~54 M pixels), a few minutes
  python benchmarks/bench_metrics.py --small    # 24 maps of 256x256, seconds

Prints:
- our three pixel metrics (one pixel_metrics call) vs scikit-learn's roc_auc_score,
  average_precision_score and precision_recall_curve on the same flattened arrays (target >= 10x);
- PRO ("musc", and "mvtec" for information) vs a per-threshold reference (200 full-image
  thresholdings, one pass per component), timed on a subset of images and scaled to all images
  (target >= 10x);
- peak traced memory (tracemalloc; NumPy reports its buffers to it) of pixel_metrics and of PRO,
  relative to the size of the input maps (target <= 3x);
- with a CUDA device, the torch path (CUDA tensors) too.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
from scipy import ndimage
import sklearn.metrics  # noqa: F401  (imported before timing: its import takes seconds)

from anorefiner.metrics import pixel_metrics, prepare_pixels, pro, pro_from_pixels
from anorefiner.metrics.curves import binary_metrics


def synthetic_category(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Maps float32 [n,size,size] and masks bool: 60% anomalous images with 1-3 irregular blobs
    (about 0.5-6% of their pixels), smooth background noise, a blurred signal over the defects."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    maps = np.empty((n, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    low = max(size // 16, 4)
    for i in range(n):
        if rng.random() < 0.6:
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.uniform(0.15, 0.85, 2)
                ry, rx = rng.uniform(0.03, 0.12, 2)
                wobble = ndimage.zoom(rng.standard_normal((low, low)), size / low, order=1)[:size, :size]
                masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 + 0.3 * wobble < 1.0
        background = ndimage.zoom(rng.standard_normal((low, low)).astype(np.float32), size / low, order=1)
        signal = ndimage.gaussian_filter(masks[i].astype(np.float32), 3.0) * rng.uniform(0.5, 2.0)
        maps[i] = background[:size, :size] * 0.4 + signal + rng.standard_normal((size, size)).astype(np.float32) * 0.3
    return maps, masks


def sklearn_pixel(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    y, s = masks.reshape(-1), maps.reshape(-1)
    p, r, _ = precision_recall_curve(y, s)
    ok = (p + r) > 0
    return {
        "auroc": roc_auc_score(y, s),
        "ap": average_precision_score(y, s),
        "f1_max": float(np.max(2 * p[ok] * r[ok] / (p[ok] + r[ok]))),
    }


def reference_pro_musc(maps: np.ndarray, masks: np.ndarray, lo: float, hi: float, steps: int = 200) -> None:
    """MuSc-style per-threshold loop (components labelled once, which only helps the baseline)."""
    comps = []
    for i in range(masks.shape[0]):
        lab, k = ndimage.label(masks[i], structure=np.ones((3, 3)))
        comps += [(i, np.nonzero(lab == c)) for c in range(1, k + 1)]
    normal = ~masks
    n_normal = normal.sum()
    for k in range(steps):
        binary = maps > lo + k * (hi - lo) / steps
        _ = np.mean([binary[i][c].mean() for i, c in comps])
        _ = np.logical_and(binary, normal).sum() / n_normal


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def peak_ratio(fn, base_bytes: int, *args, **kwargs) -> float:
    tracemalloc.start()
    try:
        fn(*args, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / base_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="24 maps of 256x256 (quick check)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-images", type=int, default=10, help="images the PRO reference is timed on")
    ap.add_argument("--skip-sklearn", action="store_true")
    args = ap.parse_args()
    n, size = (24, 256) if args.small else (args.n, args.size)

    maps, masks = timed(synthetic_category, n, size, args.seed)[0]
    mb = maps.nbytes / 2**20
    print(f"data: {n} maps of {size}x{size} = {maps.size / 1e6:.1f} M pixels, {mb:.0f} MiB float32, "
          f"{masks.mean() * 100:.2f}% anomalous pixels, {masks.any(axis=(1, 2)).sum()} anomalous images")

    ours, t_ours = timed(pixel_metrics, maps, masks)
    print(f"pixel metrics (ours, one call, AUROC+AP+F1max): {t_ours:7.2f} s  {ours}")
    if not args.skip_sklearn:
        ref, t_ref = timed(sklearn_pixel, maps, masks)
        diff = max(abs(ours[k] - ref[k]) for k in ours)
        print(f"pixel metrics (scikit-learn, 3 calls):         {t_ref:7.2f} s  max |diff| {diff:.2e}")
        print(f"  speed-up vs scikit-learn: {t_ref / t_ours:.1f}x (target >= 10x)")

    p_musc, t_musc = timed(pro, maps, masks, "musc")
    p_mvtec, t_mvtec = timed(pro, maps, masks, "mvtec")
    print(f"PRO musc (ours):  {t_musc:7.2f} s  value {p_musc:.6f}")
    print(f"PRO mvtec (ours): {t_mvtec:7.2f} s  value {p_mvtec:.6f} (exact AU-PRO, every threshold)")
    def shared():  # evaluate_category's path: one sort serves the pixel metrics and PRO
        px = prepare_pixels(maps, masks, connectivity=8, keep_sorted=True)
        binary_metrics(px.ranked)
        return pro_from_pixels(px, "musc"), pro_from_pixels(px, "mvtec")

    _, t_shared = timed(shared)
    print(f"pixel metrics + PRO musc + PRO mvtec sharing one sort (evaluate_category path): {t_shared:.2f} s")
    k = min(args.ref_images, n)
    sub_maps, sub_masks = maps[:k], masks[:k]
    _, t_sub = timed(reference_pro_musc, sub_maps, sub_masks, float(maps.min()), float(maps.max()))
    t_ref_pro = t_sub * n / k
    print(f"PRO reference (200 thresholds x full-image passes): {t_sub:.2f} s on the first {k} images, "
          f"scaled x{n / k:.1f} to {n} images: ~{t_ref_pro:.1f} s (estimate)")
    print(f"  speed-up vs per-threshold reference (musc): {t_ref_pro / t_musc:.1f}x (target >= 10x)")

    r_px = peak_ratio(pixel_metrics, maps.nbytes, maps, masks)
    r_pro = peak_ratio(pro, maps.nbytes, maps, masks, "musc")
    r_pro2 = peak_ratio(pro, maps.nbytes, maps, masks, "mvtec")
    print(f"peak traced memory / input maps: pixel_metrics {r_px:.2f}x, PRO musc {r_pro:.2f}x, "
          f"PRO mvtec {r_pro2:.2f}x (target <= 3x; masks add 0.25x of input as bool, not counted)")

    half = maps.astype(np.float16)
    _, t_half = timed(pixel_metrics, half, masks)
    print(f"pixel metrics on float16 maps (refined-store dtype): {t_half:.2f} s")

    import torch

    if torch.cuda.is_available():
        dm, dk = torch.from_numpy(maps).cuda(), torch.from_numpy(masks).cuda()
        pixel_metrics(dm, dk)  # warm-up
        torch.cuda.synchronize()
        out, t_gpu = timed(pixel_metrics, dm, dk)
        print(f"pixel metrics, CUDA tensors ({torch.cuda.get_device_name()}): {t_gpu:.2f} s  "
              f"max |diff| vs CPU {max(abs(out[k] - ours[k]) for k in ours):.2e}")
        _, t_gpu_pro = timed(pro, dm, dk, "musc")
        print(f"PRO musc, CUDA tensors: {t_gpu_pro:.2f} s")


if __name__ == "__main__":
    main()
