"""Feature-cache benchmark (run by hand; prints ratios measured in this one run).

1. Extraction overhead: ``extract_features`` (decode + preprocess + forward + HDF5 write) against the
   bare ``backbone.forward`` over the same, already preprocessed images. Target: <= 10 % overhead.
   Baseline named "bare forward". Shown with the prefetch thread (workers=1) and inline (workers=0).
2. Reading a category's cache back against recomputing it (decode + preprocess + forward).
   Target: >= 20x faster.
3. Size per 100 images of the paper's cache (ViT-L-14-336 at 518, layers 6/12/18/24, float16),
   from the layout, and measured on a few images with random weights (``--vitl-images 0`` skips).

Usage: python benchmarks/bench_features.py [--images 24] [--repeats 3] [--vitl-images 2]
Images: the real MVTec AD bottle test images when ../shared is present, else a generated demo set.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANOREFINER_NO_PROGRESS", "1")

import torch  # noqa: E402

from anorefiner.backbones import build_backbone  # noqa: E402
from anorefiner.cache import extract_features, read_features  # noqa: E402
from anorefiner.data.index import index_category, load_image  # noqa: E402

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"


def benchmark_index(tmp: Path, n: int):
    if (BOTTLE / "bottle").is_dir():
        index, source = index_category(BOTTLE, "bottle"), "MVTec AD bottle (900x900 PNG)"
    else:
        from anorefiner.data.demo import generate_demo

        generate_demo(tmp / "demo", categories=("tiles",), image_size=256, n_train=1, n_test=n, seed=0)
        index, source = index_category(tmp / "demo", "tiles", dataset="demo"), "generated demo (256 px)"
    test = index[index["split"] == "test"].head(n)
    return test.reset_index(drop=True), source


def bare_forward(backbone, batches) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        backbone.forward(batch)
    return time.perf_counter() - t0


def bench_backbone(name: str, index, tmp: Path, batch_size: int, repeats: int) -> None:
    bb = build_backbone(name, 224, pretrained=None)
    paths = list(index["image_path"])
    batches = [bb.preprocess([load_image(p) for p in paths[a : a + batch_size]]) for a in range(0, len(paths), batch_size)]
    bare_forward(bb, batches[:1])  # warm-up (allocator, kernels)
    times = {"bare": [], 1: [], 0: []}
    for r in range(repeats):  # interleaved; the machine is shared, so each repeat gives its own ratio
        times["bare"].append(bare_forward(bb, batches))
        for workers in (1, 0):
            out = tmp / f"{name}-{workers}-{r}.h5"
            t0 = time.perf_counter()
            extract_features(index, bb, out, batch_size=batch_size, workers=workers)
            times[workers].append(time.perf_counter() - t0)
    n = len(paths)
    bare = min(times["bare"])
    print(f"\n[{name} @224, random weights, {n} images, batch {batch_size}, torch threads {torch.get_num_threads()}]")
    print(f"  bare forward (baseline)        {bare:7.2f} s  ({bare / n * 1000:6.1f} ms/img)  runs {_fmt(times['bare'])}")
    for workers in (1, 0):
        ratios = sorted(t / b for t, b in zip(times[workers], times["bare"]))
        med = ratios[len(ratios) // 2]
        print(f"  extract + write, workers={workers}    {min(times[workers]):7.2f} s  runs {_fmt(times[workers])}  "
              f"ratio to bare: median {med:5.3f} (overhead {100 * (med - 1):+5.1f} %), best-of {min(times[workers]) / bare:5.3f}")

    recompute = float("inf")
    read = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for a in range(0, n, batch_size):
            bb.forward(bb.preprocess([load_image(p) for p in paths[a : a + batch_size]]))
        recompute = min(recompute, time.perf_counter() - t0)
        t0 = time.perf_counter()
        read_features(tmp / f"{name}-1-0.h5")
        read = min(read, time.perf_counter() - t0)
    size = (tmp / f"{name}-1-0.h5").stat().st_size
    print(f"  recompute (decode+forward)     {recompute:7.2f} s")
    print(f"  read cache back (float32)      {read:7.3f} s  speed-up x{recompute / read:7.1f}  (target >= 20)")
    print(f"  file size                      {size / 1e6:7.2f} MB for {n} images")


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def vitl_size(index, tmp: Path, n_images: int) -> None:
    grid, width, layers, cls_dim = 518 // 14, 1024, 4, 1024
    per_image = layers * grid * grid * width * 2 + cls_dim * 4  # float16 tokens + float32 class token
    print("\n[ViT-L-14-336 @518, layers 6/12/18/24, float16]")
    print(f"  from the layout: {per_image / 1e6:.2f} MB/image -> {100 * per_image / 1e9:.3f} GB per 100 images")
    if n_images <= 0:
        return
    bb = build_backbone("ViT-L-14-336", 518, pretrained=None)
    out = tmp / "vitl.h5"
    t0 = time.perf_counter()
    extract_features(index.head(n_images), bb, out, batch_size=1)
    took = time.perf_counter() - t0
    size = out.stat().st_size
    print(f"  measured on {n_images} images (random weights): {size / 1e6:.2f} MB -> "
          f"{100 * size / n_images / 1e9:.3f} GB per 100 images; {took / n_images:.1f} s/image on this CPU")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vitl-images", type=int, default=2)
    parser.add_argument("--backbones", nargs="*", default=["efficientnet_lite0", "ViT-B-16"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        index, source = benchmark_index(tmp, args.images)
        print(f"images: {len(index)} from {source}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        for name in args.backbones:
            bench_backbone(name, index, tmp, args.batch_size, args.repeats)
        vitl_size(index, tmp, args.vitl_images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
