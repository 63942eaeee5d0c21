"""``anorefiner train-seas``: one category's SeaS model (rule ``train_seas``; :mod:`anorefiner.seas.train`)."""

from __future__ import annotations

NAME = "train-seas"
HELP = ("fine-tune Stable Diffusion on a category's few real anomaly images per defect type (SeaS, AnoRefiner "
        "Table 5 (c)) and train its mask head")


def add_arguments(p) -> None:
    p.add_argument("--root", required=True, help="dataset root (MVTec layout)")
    p.add_argument("--dataset", required=True, help="dataset name (mvtec_ad, visa, demo)")
    p.add_argument("--category", required=True, help="category folder under the dataset root")
    p.add_argument("--weights", required=True, help="Stable Diffusion folder in diffusers layout (rule sd_weights)")
    p.add_argument("--options", default="{}", help="JSON of SeaSConfig fields (config seas.options + seas.datasets)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto (CUDA when present)")
    p.add_argument("--out", required=True, help="model folder, e.g. results/seas/<dataset>/<category>")


def main(args) -> int:
    from ..backbones import resolve_device
    from ..config import parse_json_options
    from ..seas.config import SeaSConfig
    from ..seas.train import train_seas
    from ..seeding import seed_everything

    config = parse_json_options(args.options, SeaSConfig, "seas")
    config.validate()
    seed_everything(config.seed)
    train_seas(args.root, args.dataset, args.category, args.weights, config, args.out,
               device=resolve_device(args.device))
    return 0
