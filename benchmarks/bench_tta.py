"""TTA benchmark (run by hand, on a GPU for the paper's setting): one group through each method.

Times one group of ``--images`` images (default u = 30) at ``--resolution`` (518) through SAR, DeYO and
TIPI on MuSc (random ``--backbone`` weights, default ViT-L-14-336: the cost does not depend on the
weights), with the adaptation step and the post-update maps timed separately, and prints the peak
GPU memory of each. This is where ``tta.micro_batch`` is sized (issue 14).

Usage: python benchmarks/bench_tta.py [--images 30] [--resolution 518] [--micro-batch 5]
       [--backbone ViT-L-14-336] [--device cuda] [--methods sar deyo tipi]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANOREFINER_NO_PROGRESS", "1")

import torch  # noqa: E402

from anorefiner.backbones import build_backbone  # noqa: E402
from anorefiner.tta import TTAConfig, build_tta_backend  # noqa: E402
from anorefiner.tta.adapt import Adapter, build_method  # noqa: E402
from anorefiner.tta.common import torch_generator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--resolution", type=int, default=518)
    ap.add_argument("--micro-batch", type=int, default=5)
    ap.add_argument("--backbone", default="ViT-L-14-336")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", nargs="+", default=["sar", "deyo", "tipi"])
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    backbone = build_backbone(args.backbone, args.resolution, pretrained=None, device=device, seed=0)
    x = torch.randn(args.images, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    print(f"{args.backbone} random weights, {args.images} images at {args.resolution} px, micro-batch "
          f"{args.micro_batch}, {device}")
    for name in args.methods:
        cfg = TTAConfig(micro_batch=args.micro_batch)
        backend = build_tta_backend("musc", "musc_star", {"group_size": args.images}, backbone, cfg, 0, device)
        method = build_method(name, cfg)
        adapter = Adapter(backend, method, cfg, nominal_batch=args.images)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        backend.begin_group(x.to(device))
        sync()
        t1 = time.perf_counter()
        log = method.step(adapter, x, torch_generator(0, "bench", name))
        sync()
        t2 = time.perf_counter()
        backend.begin_group(x.to(device), calibrate=False)
        maps, _ = backend.predict(x, list(range(args.images)))
        sync()
        t3 = time.perf_counter()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        print(f"{name:5s} context {t1 - t0:7.1f} s  step {t2 - t1:7.1f} s  post-update maps {t3 - t2:7.1f} s  "
              f"total {t3 - t0:7.1f} s  peak GPU {peak:6.1f} GiB  kept {log['kept_fraction']:.3f}  "
              f"maps {tuple(maps.shape)}")
        adapter.release()


if __name__ == "__main__":
    main()
