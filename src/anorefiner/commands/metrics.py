"""``anorefiner metrics``: score one category's coarse or refined maps against the ground truth."""

from __future__ import annotations

import argparse

NAME = "metrics"
HELP = "image/pixel AUROC, AP, F1-max and PRO of one category's maps, as tidy CSV rows"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="dataset root (MVTec layout)")
    p.add_argument("--dataset", required=True, help="dataset name recorded in the rows (mvtec_ad, visa, demo)")
    p.add_argument("--category", required=True, help="category folder under the dataset root")
    p.add_argument("--backend", required=True, help="backend name recorded in the rows (config backends.<name>)")
    p.add_argument("--variant", required=True, help="'coarse' scores a coarse store as is")
    p.add_argument("--seed", type=int, required=True, help="run seed recorded in the rows")
    p.add_argument("--source", required=True, help="coarse store (.h5) or refined store (.h5)")
    p.add_argument("--options", default="", help="JSON of the config's `evaluation` section (EvalConfig)")
    p.add_argument("--out", required=True, help="tidy CSV; the provenance of the scored store is written beside it "
                                               "(<stem>.provenance.json, docs/audit.md)")


def main(args) -> int:
    from dataclasses import asdict

    from anorefiner import stages
    from anorefiner.config import parse_json_options
    from anorefiner.log import LOG
    from anorefiner.metrics import EvalConfig
    from anorefiner.metrics.tidy import tidy_frame, write_metrics_csv
    from anorefiner.provenance import write_metrics_provenance

    cfg = parse_json_options(args.options, EvalConfig, "evaluation")
    rows = stages.evaluate(args.root, args.dataset, args.category, args.source, cfg)
    frame = tidy_frame(rows, args.dataset, args.category, args.backend, args.variant, args.seed)
    write_metrics_csv(args.out, frame)
    write_metrics_provenance(args.out, args.source, stages.stored_attrs(args.source), settings=asdict(cfg))
    LOG.info("wrote %d metric rows (%s, %s, seed %d) to %s", len(frame), args.backend, args.variant, args.seed,
             args.out)
    return 0
