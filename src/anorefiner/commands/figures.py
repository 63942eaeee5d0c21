"""``anorefiner figures``: the qualitative grid (Fig. 7) or per-category coarse-vs-refined bars."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..log import LOG

NAME = "figures"
HELP = "draw the qualitative grid of refined stores (Fig. 7) or per-category pixel-AP bars"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=("qualitative", "bars"), required=True,
                        help="qualitative: the grid of refined maps (Fig. 7); bars: per-category coarse-vs-refined pixel AP")
    parser.add_argument("--stores", nargs="*", default=[],
                        help="qualitative: refined stores results/refined/<dataset>/<backend>/<variant>/seed<k>/<category>.h5")
    parser.add_argument("inputs", nargs="*",
                        help="refined stores (qualitative) or metric CSVs (bars); same as --stores/--metrics")
    parser.add_argument("--data-root", "--root", action="append", default=[], metavar="[DATASET=]PATH",
                        help="qualitative: MVTec-layout root of a dataset (repeatable; a bare PATH applies to "
                             "every dataset; default resources/datasets/<dataset>)")
    parser.add_argument("--n-per-category", type=int, default=1,
                        help="qualitative: test images per store (largest anomalous area first)")
    parser.add_argument("--metrics", nargs="*", default=[], help="bars: tidy metric CSVs")
    parser.add_argument("--dataset", help="dataset key (bars default: the only one in the metrics; "
                                           "qualitative: checked against the store paths)")
    parser.add_argument("--backend", help="backend (as --dataset)")
    parser.add_argument("--variant", help="bars: refined variant (default: the only one besides 'coarse')")
    parser.add_argument("--metric", default="pixel_ap", help="bars: metric to plot")
    parser.add_argument("--out", required=True, help="PNG path")


def _roots(specs: list[str]) -> tuple[dict[str, str], str | None]:
    named, bare = {}, None
    for spec in specs:
        if "=" in spec:
            name, path = spec.split("=", 1)
            named[name] = path
        else:
            bare = spec
    return named, bare


def _only(frame, column: str, given: str | None) -> str:
    if given:
        return given
    values = sorted(frame[column].unique())
    if len(values) != 1:
        raise ValueError(f"--{column} is needed: the metric files hold {column}s {values}")
    return values[0]


def main(args: argparse.Namespace) -> int:
    from .. import figures

    if args.kind == "qualitative":
        stores = list(args.stores) + list(args.inputs)
        if not stores:
            raise ValueError("--kind qualitative needs refined stores (--stores or positional)")
        named, bare = _roots(args.data_root)
        items = []
        for store in stores:
            parts = figures.parse_store_path(store)
            for key in ("dataset", "backend"):
                given = getattr(args, key)
                if given and parts[key] != given:
                    raise ValueError(f"store {store} is for {key} {parts[key]!r}, not --{key} {given!r}")
            root = named.get(parts["dataset"]) or bare or f"resources/datasets/{parts['dataset']}"
            label = f"{parts['category']} / {parts['backend']}"
            items.append(figures.QualitativeItem(Path(store), Path(root), parts["dataset"], parts["category"], label))
        out = figures.qualitative_grid(items, args.out, n_per_item=args.n_per_category)
    else:
        files = list(args.metrics) + list(args.inputs)
        if not files:
            raise ValueError("--kind bars needs metric CSVs (--metrics or positional)")
        from ..tables.render import load_metrics

        frame = load_metrics(files)
        dataset = _only(frame, "dataset", args.dataset)
        backend = _only(frame, "backend", args.backend)
        variant = _only(frame[frame["variant"] != "coarse"], "variant", args.variant)
        out = figures.pixel_ap_bars(frame, args.out, dataset, backend, variant, args.metric)
    LOG.info("wrote %s", out)
    return 0
