"""MuSc speed and memory: chunked ``zsad.musc.backend.score`` vs a direct unchunked implementation.

Workload (default): one category of ``--n`` 200 images, 37x37 tokens of 1024 channels, 4 layers,
r in {1,3,5} (random float tokens). Prints wall time and peak RSS of the chunked implementation
on ``--n`` images, and both implementations on ``--n-direct`` images (baseline: "direct" = one
``torch.cdist`` of each image's patches against all other images' patches at once, no chunking),
with the ratio. MuSc's cost grows with N^2: extrapolate with (N/n)^2.

The full workload is 12 identical passes (4 layers x 3 values of r) over all image pairs. ``--passes K``
runs only the first K of them on all ``--n`` images (all 4 layers stay in memory, so the peak memory
is that of the full run) and prints the time per pass and the total it implies (x 12 / K).

    python benchmarks/bench_musc.py --n 40 --n-direct 20
    python benchmarks/bench_musc.py --n 200 --n-direct 12 --passes 1   # 200 images, one pass
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from anorefiner.zsad.musc import backend as musc


def direct(tokens: dict, r_list=(1, 3, 5), topmin=0.3) -> torch.Tensor:
    n, h, w, _ = next(iter(tokens.values())).shape
    k = max(1, int((n - 1) * topmin))
    out = torch.zeros(n, h * w)
    for r in r_list:
        for x in tokens.values():
            z = x.float().permute(0, 3, 1, 2)
            z = F.layer_norm(z, z.shape[1:], eps=1e-5)
            if r > 1:
                z = F.avg_pool2d(z, r, 1, (r - 1) // 2, count_include_pad=True)
            z = z.permute(0, 2, 3, 1).reshape(n, h * w, -1)
            z = z / z.norm(dim=-1, keepdim=True)
            for i in range(n):
                others = torch.cat([z[:i], z[i + 1 :]]).reshape(-1, z.shape[-1])
                d = torch.cdist(z[i], others).reshape(h * w, n - 1, h * w).amin(-1)
                out[i] += d.topk(k, dim=1, largest=False).values.mean(1) / (len(tokens) * len(r_list))
    return out.reshape(n, h, w)


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--n-direct", type=int, default=40)
    p.add_argument("--grid", type=int, default=37)
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--chunk", type=int, default=musc.DEFAULT_CHUNK)
    p.add_argument("--passes", type=int, default=None, help="run only the first K (r, layer) passes at --n")
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    shape = (a.n, a.grid, a.grid, a.channels)
    tokens = {str(6 * (i + 1)): torch.randn(shape, generator=g).half() for i in range(a.layers)}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, tokens {a.layers} x {shape} float16 "
          f"({sum(t.numel() * 2 for t in tokens.values()) / 2**30:.2f} GiB)")
    sub = {k: v[: a.n_direct] for k, v in tokens.items()}
    t = time.perf_counter()
    ref = direct(sub)
    t_direct = time.perf_counter() - t
    print(f"direct  n={a.n_direct}: {t_direct:.1f} s, peak RSS so far {peak_gib():.2f} GiB")
    t = time.perf_counter()
    got = musc.score(sub, chunk=a.chunk)
    t_chunk_sub = time.perf_counter() - t
    err = (got - ref).abs().max().item()
    print(f"chunked n={a.n_direct}: {t_chunk_sub:.1f} s; max |chunked - direct| = {err:.2e}; "
          f"ratio chunked/direct = {t_chunk_sub / t_direct:.2f}")
    r_list = (1, 3, 5)
    all_passes = [(r, k) for r in r_list for k in tokens]
    passes = all_passes[: a.passes] if a.passes else all_passes
    t = time.perf_counter()
    for r, k in passes:
        tp = time.perf_counter()
        musc.score({k: tokens[k]}, (r,), chunk=a.chunk)
        print(f"  pass r={r} layer={k}: {time.perf_counter() - tp:.1f} s", flush=True)
    t_full = (time.perf_counter() - t) * len(all_passes) / len(passes)
    measured = "measured" if len(passes) == len(all_passes) else f"{len(passes)} of {len(all_passes)} passes measured, x{len(all_passes) / len(passes):g}"
    print(f"chunked n={a.n}: {t_full:.1f} s ({measured}; {t_full / a.n:.2f} s/image), peak RSS {peak_gib():.2f} GiB")
    if a.n < 200:
        est = t_full * (200 / a.n) ** 2
        print(f"extrapolated to n=200 (x(200/{a.n})^2 for the distance part): ~{est / 60:.0f} min on this machine")


if __name__ == "__main__":
    main()
