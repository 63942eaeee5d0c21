"""RareCLIP rarity memory speed and memory: vectorised ``zsad.rareclip.memory`` vs a per-patch loop.

Workload (default): one category stream of ``--images`` 200 images of 37x37 random tokens of 1024
channels, ``--layers`` 4 rarity layers x r in {1, 3} = 8 memory banks (RareCLIP's defaults: 3 x 1369
prototypes kept by SCS, 200 PSM rows, top-3). Each image is scored against every bank, then appended
(PFM/PSM), sampled and trimmed, exactly as the backend does.

Prints images/s and the peak memory (peak RSS from ``resource``; peak Python-heap allocations from
``tracemalloc``; the banks' tensor bytes) of the vectorised memory, and the same stream through the
baseline on ``--baseline-images`` images: "loop" = the unvectorised reading of the official code, one
patch at a time for the rarity (top-k, loose similarity, PSM look-up, estimate) and one prototype at a
time for SCS's maximum similarity to the earlier prototypes, recomputed from scratch at every image (the
vectorised bank keeps each prototype's value and recomputes only those whose nearest earlier prototype
was dropped). The ratio compares the seconds over the same first images (the first image has no
memory, so at least 5 are needed to reach sampling, which starts at image 4); the rarity maps of
the last of them are compared too.

    OMP_NUM_THREADS=1 python benchmarks/bench_rareclip_memory.py --images 200 --baseline-images 6
    python benchmarks/bench_rareclip_memory.py --images 12 --layers 1 --baseline-images 6   # quick
"""

from __future__ import annotations

import argparse
import math
import resource
import time
import tracemalloc

import torch

from anorefiner.zsad.rareclip.memory import RarityBank, aggregate, loose_similarity


class LoopBank(RarityBank):
    """The baseline: the same memory, scored one patch and sampled one prototype at a time."""

    def score(self, feats):
        if self.pfm is None:
            return None
        n, s = feats.shape[0], self.psm.shape[0]
        top_sim = torch.empty(n, self.topk)
        top_idx = torch.empty(n, self.topk, dtype=torch.long)
        col_max = torch.full((self.pfm.shape[0],), -math.inf)
        for i in range(n):
            sims = self.pfm @ feats[i]
            v, j = torch.topk(sims, self.topk)
            top_sim[i], top_idx[i] = v, j
            col_max = torch.maximum(col_max, sims)
        top_sim = loose_similarity(top_sim, self.ls_ratio)
        ref_prob = torch.empty(s, n)
        rare = torch.empty(n)
        k = max(1, int(math.ceil(s * self.rare_thd)))
        for i in range(n):
            ref_prob[:, i] = (top_sim[i] * self.psm[:, top_idx[i]]).mean(-1)
            rare[i] = 1 - torch.topk(ref_prob[:, i], k).values.mean()
        return rare, ref_prob, loose_similarity(col_max, self.ls_ratio)

    def update(self, feats, scored=None):
        """Append, then SCS from scratch (one prototype at a time), then the PSM row limit."""
        ones = torch.ones((1, feats.shape[0]))
        if self.pfm is None:
            self.pfm, self.psm = feats.clone(), ones
        else:
            _, ref_prob, ref_sim = scored[:3]
            self.pfm = torch.cat([self.pfm, feats])
            self.psm = torch.cat([torch.cat([self.psm, ref_sim.unsqueeze(0)]), torch.cat([ref_prob, ones])], dim=1)
        keep = self.keep_prototypes
        if self.pfm.shape[0] > keep:
            m = self.pfm.shape[0]
            score = torch.zeros(m)
            for a in range(1, m):
                score[a] = max(0.0, float((self.pfm[:a] @ self.pfm[a]).max()))
            idx = torch.sort(torch.topk(score, keep, largest=False).indices).values
            self.pfm, self.psm = self.pfm[idx].contiguous(), self.psm[:, idx].contiguous()
        if self.psm.shape[0] > self.keep_rows:
            self.psm = self.psm[1:].contiguous()


def run(bank_cls, n_images: int, layers: int, grid: int, width: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    banks = {(r, l): bank_cls(3 * grid * grid) for r in (1, 3) for l in range(layers)}
    times, last = [], {}
    for _ in range(n_images):
        tokens = [torch.randn(grid, grid, width, generator=gen) for _ in range(layers)]
        t0 = time.perf_counter()
        for (r, l), bank in banks.items():
            feats = aggregate(tokens[l], r)
            scored = bank.score(feats)
            last[(r, l)] = None if scored is None else scored[0]
            bank.update(feats, scored)
        times.append(time.perf_counter() - t0)
    nbytes = sum(b.pfm.numel() * 4 + b.psm.numel() * 4 for b in banks.values())
    return times, nbytes, last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--baseline-images", type=int, default=6)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--grid", type=int, default=37)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; {args.layers} layers x r in {{1,3}}, "
          f"{args.grid}x{args.grid}x{args.width} random tokens")
    tracemalloc.start()
    times, nbytes, _ = run(RarityBank, args.images, args.layers, args.grid, args.width, args.seed)
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = sum(times)
    steady = 1000 * sum(times[5:]) / max(1, len(times) - 5)
    print(f"vectorised: {args.images} images in {total:.1f} s = {args.images / total:.3f} images/s "
          f"({1000 * total / args.images:.0f} ms/image; steady state {steady:.0f} ms/image); banks "
          f"{nbytes / 2**20:.1f} MiB; peak RSS {rss:.0f} MiB; peak Python heap {py_peak / 2**20:.2f} MiB "
          f"(torch tensors are outside tracemalloc: see the RSS)")
    nb = min(args.baseline_images, args.images)
    if nb > 0:
        base, _, got = run(LoopBank, nb, args.layers, args.grid, args.width, args.seed)
        _, _, want = run(RarityBank, nb, args.layers, args.grid, args.width, args.seed)
        diff = max(float((got[k] - want[k]).abs().max()) for k in got if got[k] is not None) if nb > 1 else 0.0
        fast = sum(times[:nb])
        print(f"baseline (per-patch / per-prototype loop): {nb} images in {sum(base):.1f} s = "
              f"{nb / sum(base):.3f} images/s; vectorised on the same {nb} images {fast:.1f} s; "
              f"speed-up x{sum(base) / fast:.1f}; max |rarity map difference| on image {nb}: {diff:.2e}")


if __name__ == "__main__":
    main()
