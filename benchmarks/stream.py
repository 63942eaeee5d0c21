"""The stream mode on a replayed production line: latency per image, throughput, ARD turnaround, vs offline.

A replay thread copies N test images of one real category (a seeded shuffle: good and defective parts mixed, as a
line delivers them) into a watched folder at ``--rate`` images per second (temp name, then rename), and
``anorefiner.stream.run_stream`` runs on that folder in this process. Measured from the replay's own arrival
times: latency per image (arrival -> maps, overlay and log line written; p50, p95, max), throughput
(images / (last answer - first arrival)), and per trained group the time from its last image being answered to
its ARD being in service (``groups.jsonl``). Baseline, in the same run and on the same N images in the same
order: the offline pipeline (features of all images, MuSc over the whole set, PGT with ``group_order: index``)
whose wall time / N is its per-image cost; the ratios are printed.

    OMP_NUM_THREADS=1 python benchmarks/stream.py --data-root ../shared/data/mvtec_ad --category bottle \
        --n-images 24 --group-size 8 --rate 0.5 --preset cpu --out benchmarks/out/stream

JSON summary: ``OUT/summary.json``; the stream's own outputs: ``OUT/stream/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np


GROUP_KEYS = ("group", "train_s", "pseudo_anomalies_s", "epochs_s", "complete_to_service_s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="MVTec-layout root holding the category")
    p.add_argument("--category", default="bottle")
    p.add_argument("--n-images", type=int, default=24, help="test images replayed (a seeded shuffle)")
    p.add_argument("--rate", type=float, default=0.5, help="arrivals per second")
    p.add_argument("--group-size", type=int, default=8, help="PGT's u (the paper: 30; smaller: a short run trains)")
    p.add_argument("--window", type=int, default=30, help="MuSc: earlier images each one is scored against")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--backend", default="musc_cnn")
    p.add_argument("--preset", choices=["paper", "cpu"], default="cpu")
    p.add_argument("--options", default="{}", help="refiner options JSON on top of --preset")
    p.add_argument("--eval-resolution", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-offline", action="store_true", help="stream only (no baseline)")
    p.add_argument("--out", default="benchmarks/out/stream")
    return p.parse_args(argv)


def setup(args):
    from anorefiner import stages
    from anorefiner.backbones import build_backbone
    from anorefiner.commands.run import CPU_PRESET, _merge
    from anorefiner.config import from_dict
    from anorefiner.data.index import index_category
    from anorefiner.refine.pgt import RefinerOptions
    from anorefiner.zsad import PRESETS

    df = index_category(args.data_root, args.category, split="test")
    order = np.random.default_rng(args.seed).permutation(len(df))[: args.n_images]
    rows = df.iloc[order]
    backbone = build_backbone(args.backbone, args.resolution, device=args.device)
    kind = PRESETS[args.backend][0]
    opts = stages.backend_options(kind, {}, dataset="mvtec_ad", category=args.category, device=args.device)
    backend = stages.make_backend(args.backend, kind, opts, backbone=backbone, seed=args.seed)
    refiner = _merge(_merge(CPU_PRESET if args.preset == "cpu" else {}, json.loads(args.options)),
                     {"pgt": {"group_size": args.group_size, "group_order": "index"}})
    options = from_dict(RefinerOptions, refiner, "refiner")
    textures = stages.load_textures("offline", args.seed, args.category)
    return list(rows.image_path), list(rows.image_id), backbone, backend, options, textures


def offline(args, paths, ids, backbone, backend, options, textures) -> dict:
    """The offline pipeline on the same images in the same order: its wall time per stage."""
    from anorefiner.cache import Features
    from anorefiner.data.index import load_image
    from anorefiner.refine.pgt import run_pgt
    from anorefiner.zsad.store import Coarse

    t0 = time.perf_counter()
    parts = {}
    for s in range(0, len(paths), 8):
        layers, _ = backbone.forward(backbone.preprocess([load_image(p) for p in paths[s:s + 8]]))
        for k, v in layers.items():
            parts.setdefault(k, []).append(v.float().cpu().numpy())
    feats = Features(ids=ids, layers={k: np.concatenate(v) for k, v in parts.items()})
    t1 = time.perf_counter()
    res = backend.coarse(feats)
    t2 = time.perf_counter()
    run_pgt(feats, Coarse(ids=ids, maps=res.maps, scores=res.scores), paths, backbone, backend, options,
            seed=args.seed, textures=textures, eval_resolution=args.eval_resolution, device=args.device)
    t3 = time.perf_counter()
    return {"features_s": t1 - t0, "coarse_s": t2 - t1, "pgt_s": t3 - t2, "total_s": t3 - t0,
            "per_image_s": (t3 - t0) / len(paths)}


def replay(paths, folder: Path, rate: float, arrivals: dict) -> None:
    start = time.time()
    for k, src in enumerate(paths):
        time.sleep(max(0.0, start + k / rate - time.time()))
        name = f"{k:04d}_{Path(src).parent.name}_{Path(src).name}"
        shutil.copyfile(src, folder / f".{name}.part")
        os.replace(folder / f".{name}.part", folder / name)
        arrivals[name] = time.time()


def stream(args, paths, backbone, backend, options, textures) -> dict:
    from anorefiner.stream import StreamConfig, run_stream

    out = Path(args.out) / "stream"
    shutil.rmtree(out, ignore_errors=True)
    folder = Path(args.out) / "line"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    arrivals: dict[str, float] = {}
    feeder = threading.Thread(target=replay, args=(paths, folder, args.rate, arrivals), daemon=True)
    config = StreamConfig(window=args.window, eval_resolution=args.eval_resolution, poll_s=0.05,
                          idle_timeout_s=max(5.0, 3.0 / args.rate), max_images=len(paths))
    feeder.start()
    t0 = time.time()
    run_stream(folder, out, backbone=backbone, backend_name=args.backend, backend=backend, options=options,
               config=config, seed=args.seed, textures=textures, device=args.device, category=args.category)
    wall = time.time() - t0
    feeder.join()
    log = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    done = {e["name"]: e["t_done"] for e in log if e["status"] == "ok"}
    latency = np.asarray([done[n] - arrivals[n] for n in done])
    groups = [json.loads(line) for line in (out / "groups.jsonl").read_text().splitlines()]
    return {"n": len(done), "latency_p50_s": float(np.percentile(latency, 50)),
            "latency_p95_s": float(np.percentile(latency, 95)), "latency_max_s": float(latency.max()),
            "throughput_img_s": len(done) / (max(done.values()) - min(arrivals.values())),
            "maps": {m: sum(e.get("map") == m for e in log) for m in ("coarse", "coarse_scaled", "refined")},
            "groups": [{k: g[k] for k in GROUP_KEYS} for g in groups],
            "wall_s": wall}


def main(argv=None) -> int:
    import torch

    from anorefiner.log import setup_logging

    args = parse_args(argv)
    setup_logging()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    paths, ids, backbone, backend, options, textures = setup(args)
    threads = torch.get_num_threads()
    base = None if args.skip_offline else offline(args, paths, ids, backbone, backend, options, textures)
    torch.set_num_threads(threads)  # the stream splits the cores between scoring and training itself
    live = stream(args, paths, backbone, backend, options, textures)
    summary = {"args": vars(args), "torch_threads": threads, "offline": base, "stream": live}
    if base:
        summary["ratio_latency_p50_to_offline_per_image"] = live["latency_p50_s"] / base["per_image_s"]
        summary["ratio_throughput_to_offline"] = live["throughput_img_s"] * base["per_image_s"]
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"stream: {live['n']} images at {args.rate}/s, u={args.group_size}, window {args.window}, "
          f"{args.backbone}@{args.resolution} + {args.backend}, device {args.device}, {threads} torch threads")
    print(f"  latency p50 {live['latency_p50_s']:.2f} s, p95 {live['latency_p95_s']:.2f} s, max "
          f"{live['latency_max_s']:.2f} s; throughput {live['throughput_img_s']:.2f} images/s; maps {live['maps']}")
    for g in live["groups"]:
        print(f"  group {g['group']}: trained in {g['train_s']:.1f} s (pseudo-anomalies "
              f"{g['pseudo_anomalies_s']:.1f} s, epochs {g['epochs_s']:.1f} s), ARD in service "
              f"{g['complete_to_service_s']:.1f} s after the group's last image")
    if base:
        print(f"offline: {base['per_image_s']:.2f} s per image (features {base['features_s']:.1f} s, coarse "
              f"{base['coarse_s']:.1f} s, PGT {base['pgt_s']:.1f} s for {len(paths)} images)")
        print("ratio: stream latency p50 / offline per-image cost = "
              f"{summary['ratio_latency_p50_to_offline_per_image']:.2f}; stream throughput / offline = "
              f"{summary['ratio_throughput_to_offline']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
