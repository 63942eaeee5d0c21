"""``anorefiner metrics``: score one category's coarse or refined maps against the ground truth."""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np

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
    p.add_argument("--options", default="", help="JSON of the config's `evaluation` section (EvalConfig)")
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

    from anorefiner.data.index import load_mask, test_rows

    df = test_rows(root, category, ids, dataset=dataset)
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
    from anorefiner.config import parse_json_options
    from anorefiner.log import LOG
    from anorefiner.metrics import EvalConfig, evaluate_category
    from anorefiner.metrics.tidy import tidy_frame, write_metrics_csv

    cfg = parse_json_options(args.options, EvalConfig, "evaluation")
    ids, methods = load_methods(args.source)
    masks, labels = ground_truth(args.root, args.dataset, args.category, ids)
    LOG.info("scoring %s/%s (%s, %s, seed %d): %d images, methods %s, PRO variant %s",
             args.dataset, args.category, args.backend, args.variant, args.seed, len(ids), sorted(methods),
             cfg.pro_variant)
    rows = evaluate_category(methods, masks, labels, cfg)
    frame = tidy_frame(rows, args.dataset, args.category, args.backend, args.variant, args.seed)
    write_metrics_csv(args.out, frame)
    LOG.info("wrote %d metric rows to %s", len(frame), args.out)
    return 0
