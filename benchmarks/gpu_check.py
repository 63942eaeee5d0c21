"""One-shot GPU check of the paper path: throughput, memory and CPU-vs-device agreement, as one JSON.

Sections (each runs the library's own entry points; a section that fails records its error and the
others still run):

- ``features``: ViT-L-14-336 at 518 px with random weights (``backbones.build_backbone``): images per
  second of ``Backbone.forward`` in float32 (what the features rule runs) and under bf16 (CUDA with bf16
  support, and CPU) or fp16 autocast, plus the CPU cost of ``Backbone.preprocess`` per image;
- ``musc``: ``zsad.musc.backend.MuscBackend.coarse`` (MuSc with RsCIN) on 200 images x 37^2 tokens x 1024 channels x 4
  layers of random tokens: seconds and peak memory;
- ``pgt``: ``refine.pgt.run_pgt`` on one category of 90 images (3 groups of u = 30; two are trained) with
  the paper-width ARD (64/256/192), r=5, l=4, 20 epochs and AMP, the real ViT for the pseudo-anomalies and
  MuSc* for their coarse maps: seconds per trained group and the stage timings;
- ``run``: ``anorefiner run`` with EfficientNet-Lite0 on the real MVTec AD bottle (``--bottle-root``);
- ``agreement``: the same random ViT, MuSc and ARD on the CPU (float32) and on the device, on small inputs:
  largest relative feature error, largest MuSc-map and ARD-logit differences.

``--quick`` shrinks every workload (112 px, a few images, 2 epochs, a generated demo category for ``run``)
so that ``--device cpu --quick`` runs in about a minute; its figures only show that every section runs.
``anorefiner plan --rates <json>`` turns a full run's figures into per-stage rates.

    python benchmarks/gpu_check.py                         # on the GPU, under 8 minutes on an H100/H200
    python benchmarks/gpu_check.py --device cpu --quick    # the CPU smoke version (its test)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from anorefiner.backbones import build_backbone, resolve_device
from anorefiner.cache import Features
from anorefiner.io import write_json_atomic
from anorefiner.log import LOG, setup_logging

SCHEMA = "anorefiner-gpu-check/1"
SECTIONS = ("environment", "features", "musc", "pgt", "run", "agreement")
BACKBONE = "ViT-L-14-336"
LAYERS = ["6", "12", "18", "24"]
# Workloads: full = the paper's geometry; quick = the same code paths at toy sizes.
FULL = dict(resolution=518, feat_batch=32, feat_batches=8, musc_n=200, pgt_n=90, pgt_u=30, pgt_r=5, pgt_l=4,
            pgt_epochs=20, agree_images=2, agree_resolution=224)
QUICK = dict(resolution=112, feat_batch=2, feat_batches=1, musc_n=8, pgt_n=6, pgt_u=3, pgt_r=1, pgt_l=2,
             pgt_epochs=2, agree_images=1, agree_resolution=112)
REPO = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> dict:
    """Peak device memory since the last reset (CUDA) and the process's peak RSS (both GiB)."""
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def autocast_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def random_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    gen = np.random.default_rng(seed)
    return [gen.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def random_features(n: int, grid: int, seed: int) -> Features:
    """Random float16 tokens in the feature cache's layout (``cache.Features``), class tokens included."""
    gen = torch.Generator().manual_seed(seed)
    layers = {k: torch.randn(n, grid, grid, 1024, generator=gen).half().numpy() for k in LAYERS}
    cls = torch.randn(n, 1024, generator=gen).numpy()
    return Features(ids=[f"test/good/{i:03d}" for i in range(n)], layers=layers, cls=cls,
                    attrs={"backbone": BACKBONE, "layers": LAYERS})


# ------------------------------------------------------------------------------------------------ sections
def section_environment(device: torch.device, w: dict, state: dict) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
           "cpu_threads": torch.get_num_threads(), "python": sys.version.split()[0]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, memory_gib=props.total_memory / 2**30,
                   bf16=torch.cuda.is_bf16_supported(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return env


def section_features(device: torch.device, w: dict, state: dict) -> dict:
    t = time.perf_counter()
    backbone = build_backbone(BACKBONE, w["resolution"], layers=LAYERS, pretrained=None, device=device)
    build_s = time.perf_counter() - t
    state["backbone"] = backbone
    images = random_images(w["feat_batch"], 700, seed=0)  # MVTec-like originals: preprocessing resizes them
    t = time.perf_counter()
    batch = backbone.preprocess(images)
    preprocess_s = (time.perf_counter() - t) / len(images)
    out = {"backbone": BACKBONE, "weights": backbone.identity["weights"], "resolution": w["resolution"],
           "grid": backbone.grid[0], "layers": LAYERS, "batch_size": w["feat_batch"], "build_s": build_s,
           "preprocess_s_per_image": preprocess_s}
    dtype = autocast_dtype(device)
    out["autocast_dtype"] = str(dtype).replace("torch.", "")
    for label, amp in (("fp32", False), ("autocast", True)):
        if amp and device.type == "cpu" and w is QUICK:
            # bf16 on a CPU without native support is emulated (~20 s per 112 px image here); the agreement
            # section still runs one autocast forward
            out["img_per_s_autocast"] = None
            out["autocast_note"] = "not timed on CPU with --quick (emulated bf16)"
            continue
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            if w is not QUICK:
                backbone.forward(batch)  # warm-up (kernels, allocator)
            sync(device)
            reset_peak(device)
            t = time.perf_counter()
            for _ in range(w["feat_batches"]):
                layers, cls = backbone.forward(batch)
            sync(device)
        seconds = time.perf_counter() - t
        n = w["feat_batch"] * w["feat_batches"]
        key = "img_per_s" if label == "fp32" else "img_per_s_autocast"
        out[key] = n / seconds
        out[f"{label}_peak"] = peak_gib(device)
        if tuple(layers["24"].shape) != (len(images), backbone.grid[0], backbone.grid[1], 1024):
            raise ValueError(f"layer 24 has shape {tuple(layers['24'].shape)}")
    return out


def section_musc(device: torch.device, w: dict, state: dict) -> dict:
    from anorefiner.zsad.musc.backend import MuscBackend, MuscConfig

    grid = w["resolution"] // 14
    feats = random_features(w["musc_n"], grid, seed=1)
    backend = MuscBackend(MuscConfig(device=str(device), dataset="mvtec_ad"), name="musc", seed=0)
    reset_peak(device)
    t = time.perf_counter()
    result = backend.coarse(feats)
    sync(device)
    seconds = time.perf_counter() - t
    if not np.isfinite(result.maps).all() or result.maps.shape != (w["musc_n"], grid, grid):
        raise ValueError(f"MuSc maps of shape {result.maps.shape} are not finite [{w['musc_n']},{grid},{grid}]")
    state["musc_feats"], state["musc_maps"], state["musc_scores"] = feats, result.maps, result.scores
    return {"n_images": w["musc_n"], "grid": grid, "channels": 1024, "layers": len(LAYERS), "r_list": [1, 3, 5],
            "seconds": seconds, "s_per_image": seconds / w["musc_n"], **peak_gib(device)}


def section_pgt(device: torch.device, w: dict, state: dict) -> dict:
    from anorefiner.data.textures import texture_source
    from anorefiner.refine.pgt import RefinerOptions, run_pgt
    from anorefiner.zsad.musc.backend import MuscBackend, MuscConfig
    from anorefiner.zsad.store import Coarse

    if "backbone" not in state or "musc_feats" not in state:
        raise ValueError("needs the features and musc sections (one of them failed)")
    n, backbone = w["pgt_n"], state["backbone"]
    src = state["musc_feats"]
    if len(src.ids) < n:  # quick: fewer MuSc images than PGT images
        src = random_features(n, w["resolution"] // 14, seed=2)
        maps = np.random.default_rng(2).random((n,) + src.layers["6"].shape[1:3]).astype(np.float32)
        scores = maps.reshape(n, -1).max(1)
    else:
        maps, scores = state["musc_maps"][:n], state["musc_scores"][:n]
    feats = Features(ids=src.ids[:n], layers={k: v[:n] for k, v in src.layers.items()}, cls=src.cls[:n],
                     attrs=src.attrs)
    coarse = Coarse(ids=list(feats.ids), maps=maps, scores=scores)
    options = RefinerOptions()  # the paper's ARD (64/256/192) and PGT, lr 1e-3
    p = options.pgt
    p.group_size, p.n_pseudo_normal, p.n_anomalies_per_normal = w["pgt_u"], w["pgt_r"], w["pgt_l"]
    p.epochs, p.amp = w["pgt_epochs"], True
    backend = MuscBackend(MuscConfig(device=str(device), group_size=w["pgt_u"]), name="musc_star", seed=0)
    images = random_images(n, w["resolution"], seed=3)
    reset_peak(device)
    t = time.perf_counter()
    refined = run_pgt(feats, coarse, images, backbone, backend, options, seed=0,
                      textures=texture_source("offline", seed=0), eval_resolution=w["resolution"], device=device)
    sync(device)
    seconds = time.perf_counter() - t
    trained = len(refined.attrs["loss_history"])
    q = min(w["pgt_r"], w["pgt_u"]) * w["pgt_l"]
    return {"n_images": n, "group_size": w["pgt_u"], "n_groups": refined.attrs["n_groups"], "trained_groups": trained,
            "n_pseudo_anomalies": q * trained, "epochs": w["pgt_epochs"], "resolution": w["resolution"], "amp": True,
            "ard": {k: getattr(options.ard, k) for k in ("anomaly_channels", "feat_channels", "aa_channels")},
            "seconds": seconds, "s_per_trained_group": seconds / max(trained, 1),
            "timings": refined.attrs["timings"],
            "final_dice_loss": [h[-1] for h in refined.attrs["loss_history"] if h], **peak_gib(device)}


def section_run(device: torch.device, w: dict, state: dict, quick: bool, bottle_root: str | None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="gpu_check_run_"))
    cmd = [sys.executable, "-m", "anorefiner", "run", "--backbone", "efficientnet_lite0", "--backend", "musc",
           "--device", device.type, "--out", str(work / "out")]
    if quick:
        from anorefiner.data.demo import generate_demo

        root = generate_demo(work / "demo", categories=("tiles",), image_size=64, n_train=1, n_test=6, seed=0)
        options = {"pgt": {"epochs": 1, "group_size": 3, "n_pseudo_normal": 1, "n_anomalies_per_normal": 2}}
        cmd += ["--data-root", str(root), "--category", "tiles", "--dataset", "demo", "--resolution", "64",
                "--eval-resolution", "64", "--preset", "cpu", "--options", json.dumps(options), "--no-pro",
                "--backend-options", json.dumps({"rscin": False})]
        data = "generated demo 'tiles' (6 test images, 64 px)"
    else:
        root = bottle_root or next((str(p) for p in (REPO.parent / "shared/data/mvtec_ad", REPO / "shared/data/mvtec_ad",
                                                     REPO / "resources/datasets/mvtec_ad") if (p / "bottle").is_dir()), None)
        if root is None or not (Path(root) / "bottle").is_dir():
            return {"skipped": "no MVTec AD bottle folder found (give --bottle-root)"}
        cmd += ["--data-root", str(root), "--category", "bottle", "--backend-options", json.dumps({"rscin": False})]
        data = f"MVTec AD bottle at {root}"
    env = dict(os.environ, ANOREFINER_NO_PROGRESS="1")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"anorefiner run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    import pandas as pd

    metrics = pd.read_csv(work / "out" / "metrics.csv")
    table = {f"{r.method}/{r.metric}": float(r.value) for r in metrics.itertuples(index=False)}
    stages = json.loads((work / "out" / "run.json").read_text()).get("timings", {})
    return {"data": data, "command": " ".join(cmd[1:]), "seconds": seconds, "stage_seconds": stages,
            "metrics": table}


def section_agreement(device: torch.device, w: dict, state: dict) -> dict:
    """Same random weights on the CPU (float32 reference) and on the device, on small inputs."""
    from anorefiner.refine.ard import ARDConfig, build_refiner
    from anorefiner.zsad.musc import backend as musc

    cpu = torch.device("cpu")
    res = w["agree_resolution"]
    ref_bb = build_backbone(BACKBONE, res, layers=LAYERS, pretrained=None, device=cpu)
    dev_bb = ref_bb if device.type == "cpu" else build_backbone(BACKBONE, res, layers=LAYERS, pretrained=None,
                                                                  device=device)
    batch = ref_bb.preprocess(random_images(w["agree_images"], res, seed=4))
    ref, _ = ref_bb.forward(batch)
    got, _ = dev_bb.forward(batch)
    with torch.autocast(device.type, dtype=autocast_dtype(device)):
        amp, _ = dev_bb.forward(batch)

    def rel(a, b):
        a, b = a.float().cpu(), b.float().cpu()
        return float((a - b).abs().max() / b.abs().max())

    out = {"reference": "cpu float32", "candidate": f"{device} float32", "resolution": res,
           "features_max_rel_err": max(rel(got[k], ref[k]) for k in LAYERS),
           "features_autocast_max_rel_err": max(rel(amp[k], ref[k]) for k in LAYERS)}
    tokens = {k: v.float() for k, v in ref.items()}
    tokens = {k: torch.cat([v, v.flip(1)]) for k, v in tokens.items()}  # 2 images per input: MuSc needs >= 2
    m_ref = musc.score(tokens, device=cpu)
    m_dev = musc.score(tokens, device=device).cpu()
    out["musc_max_abs_diff"] = float((m_dev - m_ref).abs().max())
    out["musc_map_range"] = float(m_ref.max() - m_ref.min())
    grid = res // 14
    torch.manual_seed(0)
    ard = build_refiner(1024, ARDConfig(), grid=(grid, grid), patch_stride=14).eval()
    ard_dev = build_refiner(1024, ARDConfig(), grid=(grid, grid), patch_stride=14).to(device).eval()
    ard_dev.load_state_dict(ard.state_dict())
    gen = torch.Generator().manual_seed(5)
    x, c = torch.randn(2, 1024, grid, grid, generator=gen), torch.rand(2, 1, grid, grid, generator=gen)
    with torch.no_grad():
        y_ref = ard(x, c, out_size=(res, res))
        y_dev = ard_dev(x.to(device), c.to(device), out_size=(res, res)).cpu()
    out["ard_max_abs_diff"] = float((y_dev - y_ref).abs().max())
    out["ard_logit_range"] = float(y_ref.max() - y_ref.min())
    return out


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda[:i] or cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes: shows every section runs (about a minute on CPU)")
    p.add_argument("--bottle-root", default=None, help="MVTec AD folder holding bottle/ (default: shared/ or resources/)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "gpu_check.json"), help="JSON summary path")
    args = p.parse_args(argv)
    setup_logging()
    LOG.propagate = False  # open_clip configures the root logger: one line per message, not two
    device = resolve_device(args.device)
    w = QUICK if args.quick else FULL
    summary: dict = {"schema": SCHEMA, "device": str(device), "quick": bool(args.quick), "workload": w}
    state: dict = {}
    t0 = time.perf_counter()
    for name in SECTIONS:
        LOG.info("gpu_check: %s on %s", name, device)
        t = time.perf_counter()
        try:
            fn = globals()[f"section_{name}"]
            extra = (args.quick, args.bottle_root) if name == "run" else ()
            summary[name] = fn(device, w, state, *extra)
        except Exception as err:  # a failing section is reported, the others still run
            summary[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            LOG.error("gpu_check: %s failed: %s", name, err)
        summary[name]["section_s"] = time.perf_counter() - t
    summary["device_name"] = summary["environment"].get("device_name", "cpu")
    summary["total_s"] = time.perf_counter() - t0
    write_json_atomic(args.out, summary)
    print(json.dumps(summary, indent=1, default=str))
    LOG.info("gpu_check: wrote %s in %.0f s", args.out, summary["total_s"])
    return 1 if any("error" in summary[s] for s in SECTIONS) else 0


if __name__ == "__main__":
    sys.exit(main())
