"""``anorefiner metrics``: score one category's coarse or refined maps against the ground truth."""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

NAME = "metrics"
HELP = "image/pixel AUROC, AP, F1-max and PRO of one category's maps, as tidy CSV rows"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="dataset root (MVTec layout)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--backend", required=True)
    p.add_argument("--variant", required=True, help="'coarse' scores a coarse store as is")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--source", required=True, help="coarse store (.h5) or refined store (.h5)")
    p.add_argument("--resolution", type=int, default=0, help="evaluation resolution (0: the maps' own)")
    p.add_argument("--mask-resize", choices=["nearest", "bilinear_cast"], default="nearest")
    p.add_argument("--pro-variant", choices=["musc", "mvtec"], default="musc")
    p.add_argument("--pro", dest="compute_pro", action="store_true", default=True)
    p.add_argument("--no-pro", dest="compute_pro", action="store_false")
    p.add_argument("--out", required=True)


def load_methods(source: str | Path) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Read ``{method: (maps, scores)}`` from a coarse store (method ``coarse``) or a refined store."""
    with h5py.File(source, "r") as f:
        is_refined = "maps" in f and isinstance(f["maps"], h5py.Group)
    if is_refined:
        from anorefiner.refine.store import read_refined

        refined = read_refined(source)
        methods = {m: (refined.maps[m], refined.scores[m]) for m in refined.maps}
        return list(refined.ids), methods
    from anorefiner.zsad.store import read_coarse

    coarse = read_coarse(source)
    return list(coarse.ids), {"coarse": (coarse.maps, coarse.scores)}


def ground_truth(root: str, dataset: str, category: str, ids: list[str]):
    """Masks [N,H,W] bool (native image size) and labels [N] of the test images, in ``ids`` order."""
    from PIL import Image

    from anorefiner.data.index import index_category, load_mask

    df = index_category(root, category, dataset=dataset, split="test").set_index("image_id")
    missing = [i for i in ids if i not in df.index]
    if missing:
        raise ValueError(
            f"{len(missing)} image id(s) of the maps are not in {root}/{category}: first {missing[0]!r}"
        )
    df = df.loc[ids]
    masks = []
    for image_id, row in df.iterrows():
        if row["mask_path"]:
            masks.append(load_mask(row["mask_path"]))
        else:
            # Good images have no mask file: an all-False mask of the image's size (header only).
            with Image.open(row["image_path"]) as im:
                w, h = im.size
            masks.append(np.zeros((h, w), dtype=bool))
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise ValueError(f"{root}/{category}: test images differ in size {sorted(shapes)}; "
                         "set an evaluation resolution (evaluation.resolution)")
    return np.stack(masks), df["label"].to_numpy(dtype=np.int64)


def main(args) -> int:
    from anorefiner.io import write_csv_atomic
    from anorefiner.log import LOG
    from anorefiner.metrics import EvalConfig, evaluate_category

    ids, methods = load_methods(args.source)
    resolution = args.resolution or None
    masks, labels = ground_truth(args.root, args.dataset, args.category, ids)
    cfg = EvalConfig(
        resolution=resolution,
        mask_resize=args.mask_resize,
        pro_variant=args.pro_variant,
        compute_pro=args.compute_pro,
    )
    LOG.info("scoring %s/%s (%s, %s, seed %d): %d images, methods %s",
             args.dataset, args.category, args.backend, args.variant, args.seed, len(ids), sorted(methods))
    rows = evaluate_category(methods, masks, labels, cfg)
    frame = pd.DataFrame(rows)
    frame.insert(0, "dataset", args.dataset)
    frame.insert(1, "category", args.category)
    frame.insert(2, "backend", args.backend)
    frame.insert(4, "variant", args.variant)
    frame.insert(5, "seed", args.seed)
    frame = frame[["dataset", "category", "backend", "method", "variant", "seed", "metric", "value"]]
    write_csv_atomic(args.out, frame)
    LOG.info("wrote %d metric rows to %s", len(frame), args.out)
    return 0
