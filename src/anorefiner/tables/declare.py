"""Table declarations (``config/tables/<name>.yaml``): which runs fill which paper cell.

A declaration names the paper table it reproduces (``published``: a stem of
``anorefiner/tables/published/*.csv``, or null for a table without published numbers such as the
demo), the paper datasets it covers, its columns (paper column label -> metric name of the tidy
metric CSVs) and its rows, in the paper's order::

    rows:
      - row: "MuSc/+ Ours"          # the paper's row label path
        backend: musc_star
        variant: default             # "coarse" = the backend's map without refinement
        method: combined             # default: "coarse" for variant coarse, else "combined"
        seeds: all                   # "all" = config tables.seeds; "first"; or a list of ints
      - row: "APRIL-GAN"
        not_implemented: "needs the trained linear-layer checkpoints"
      - row: "MuSc*/{category}"      # one row per category (Table 14)
        categories: [bottle, cable]
        backend: musc_star
        variant: coarse

Every row of the paper is declared, implemented or not, so no row is ever silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

METRICS = (
    "image_auroc", "image_ap", "image_f1_max",
    "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_pro",
)
METHODS = ("coarse", "ard", "combined")
DEFAULT_PAPER_DATASETS = {"MVTec AD": "mvtec_ad", "VisA": "visa"}
DEFAULT_SEEDS = [0, 1, 2, 3, 4]  # Table 1: "average performance over 5 random seeds"
DEFAULT_TOLERANCE = 1.0  # percentage points; the workflow schema's default
_ROW_KEYS = {"row", "backend", "variant", "method", "seeds", "category", "categories", "not_implemented"}
_TOP_KEYS = {"title", "published", "datasets", "columns", "rows"}


class RunKey(NamedTuple):
    """One metric-producing run: its CSVs live in ``results/metrics/<dataset>/<backend>/<variant>/seed<k>/``."""

    dataset: str
    backend: str
    variant: str
    seed: int


@dataclass(frozen=True)
class RowDecl:
    """One paper row. ``not_implemented`` holds what is missing (then no run is required)."""

    label: str
    backend: str | None = None
    variant: str | None = None
    method: str | None = None
    seeds: Any = "all"
    category: str | None = None  # a single category (Table 14 rows); None = mean over categories
    not_implemented: str | None = None

    @property
    def implemented(self) -> bool:
        return self.not_implemented is None

    def seed_list(self, config: dict) -> list[int]:
        all_seeds = [int(s) for s in table_settings(config)["seeds"]]
        if self.seeds == "all":
            return all_seeds
        if self.seeds == "first":
            return all_seeds[:1]
        return [int(s) for s in self.seeds]


@dataclass(frozen=True)
class TableDecl:
    name: str
    title: str
    published: str | None
    datasets: list[str]  # paper dataset names, e.g. ["MVTec AD", "VisA"]
    columns: dict[str, str]  # paper column label -> metric
    rows: list[RowDecl] = field(default_factory=list)
    path: str = ""

    def runs(self, config: dict) -> list[RunKey]:
        """Every (dataset, backend, variant, seed) an implemented, configured row needs."""
        keys = {RunKey(ds, row.backend, row.variant, seed): None for ds, row, seed in self.ready_runs(config)}
        return list(keys)

    def ready_runs(self, config: dict):
        """(config dataset, row, seed) of every implemented, configured row."""
        for paper_ds in self.datasets:
            for row in self.rows:
                if row_ready(row, paper_ds, config)[0]:
                    ds = dataset_key(paper_ds, config)
                    for seed in row.seed_list(config):
                        yield ds, row, seed


def table_settings(config: dict) -> dict:
    """``config["tables"]`` with defaults filled in (seeds, tolerance, paper-dataset mapping)."""
    tables = dict(config.get("tables") or {})
    tables.setdefault("seeds", list(DEFAULT_SEEDS))
    tables.setdefault("tolerance", DEFAULT_TOLERANCE)
    tables.setdefault("datasets", dict(DEFAULT_PAPER_DATASETS))
    if not tables["seeds"]:
        raise ValueError("config tables.seeds is empty: give at least one seed")
    return tables


def dataset_key(paper_dataset: str, config: dict) -> str | None:
    """Config dataset key of a paper dataset name ("MVTec AD" -> "mvtec_ad"), or None if unmapped."""
    return table_settings(config)["datasets"].get(paper_dataset)


def categories_of(dataset: str, config: dict) -> list[str]:
    try:
        return list(config["datasets"][dataset]["categories"])
    except KeyError:
        return []


def row_ready(row: RowDecl, paper_dataset: str, config: dict) -> tuple[bool, str]:
    """Whether a row can be computed for a paper dataset under ``config``; else why not."""
    if not row.implemented:
        return False, f"not implemented: {row.not_implemented}"
    ds = dataset_key(paper_dataset, config)
    if ds is None:
        return False, f"paper dataset {paper_dataset!r} is not mapped in config tables.datasets"
    if ds not in (config.get("datasets") or {}):
        return False, f"dataset {ds!r} is not in config datasets"
    if "backends" in config and row.backend not in config["backends"]:
        return False, f"backend {row.backend!r} is not in config backends"
    if row.variant != "coarse" and "variants" in config and row.variant not in config["variants"]:
        return False, f"variant {row.variant!r} is not in config variants"
    cats = categories_of(ds, config)
    if row.category is not None and row.category not in cats:
        return False, f"category {row.category!r} is not in config datasets.{ds}.categories"
    if not cats:
        return False, f"config datasets.{ds}.categories is empty"
    return True, ""


def row_categories(row: RowDecl, dataset: str, config: dict) -> list[str]:
    return [row.category] if row.category is not None else categories_of(dataset, config)


def metric_file(dataset: str, backend: str, variant: str, seed: int, category: str,
                metrics_root: str = "results/metrics") -> str:
    return f"{metrics_root}/{dataset}/{backend}/{variant}/seed{seed}/{category}.csv"


def required_metric_files(decl: TableDecl, config: dict, metrics_root: str = "results/metrics") -> list[str]:
    """The metric CSVs the table's target depends on (implemented, configured rows only), sorted."""
    return sorted({
        metric_file(ds, row.backend, row.variant, seed, cat, metrics_root)
        for ds, row, seed in decl.ready_runs(config)
        for cat in row_categories(row, ds, config)
    })


def list_tables(tables_dir: str | Path) -> list[str]:
    """Names of the declared tables (YAML stems), sorted."""
    folder = Path(tables_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"table declarations folder {folder} does not exist")
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_declaration(name: str, tables_dir: str | Path) -> TableDecl:
    """Read and validate ``<tables_dir>/<name>.yaml``; errors name the file, row and key."""
    path = Path(tables_dir) / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no table declaration {path} (declared: {', '.join(list_tables(tables_dir))})")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    where = str(path)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping at top level")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    for key in ("datasets", "columns", "rows"):
        if not data.get(key):
            raise ValueError(f"{where}: missing or empty {key!r}")
    columns = {str(k): str(v) for k, v in data["columns"].items()}
    for label, metric in columns.items():
        if metric not in METRICS:
            raise ValueError(f"{where}: column {label!r} maps to unknown metric {metric!r} (known: {METRICS})")
    rows: list[RowDecl] = []
    for i, raw in enumerate(data["rows"]):
        rows.extend(_parse_row(raw, f"{where}: rows[{i}]"))
    labels = [r.label for r in rows]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"{where}: row label(s) declared twice: {dup}")
    return TableDecl(
        name=name,
        title=str(data.get("title", name)),
        published=data.get("published"),
        datasets=[str(d) for d in data["datasets"]],
        columns=columns,
        rows=rows,
        path=where,
    )


def _parse_row(raw: Any, where: str) -> list[RowDecl]:
    if not isinstance(raw, dict) or "row" not in raw:
        raise ValueError(f"{where}: each row needs a 'row' label, got {raw!r}")
    unknown = sorted(set(raw) - _ROW_KEYS)
    if unknown:
        raise ValueError(f"{where} ({raw['row']!r}): unknown key(s) {unknown}; known: {sorted(_ROW_KEYS)}")
    label = str(raw["row"])
    if raw.get("not_implemented"):
        return [RowDecl(label=label, not_implemented=str(raw["not_implemented"]))]
    for key in ("backend", "variant"):
        if not raw.get(key):
            raise ValueError(f"{where} ({label!r}): an implemented row needs {key!r} (or 'not_implemented')")
    variant = str(raw["variant"])
    method = str(raw.get("method") or ("coarse" if variant == "coarse" else "combined"))
    if method not in METHODS:
        raise ValueError(f"{where} ({label!r}): unknown method {method!r} (known: {METHODS})")
    if variant == "coarse" and method != "coarse":
        raise ValueError(f"{where} ({label!r}): variant 'coarse' has only method 'coarse', got {method!r}")
    seeds = raw.get("seeds", "all")
    if not (seeds in ("all", "first") or (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds))):
        raise ValueError(f"{where} ({label!r}): seeds must be 'all', 'first' or a list of ints, got {seeds!r}")
    base = dict(backend=str(raw["backend"]), variant=variant, method=method,
                seeds=seeds if isinstance(seeds, str) else tuple(seeds))
    if "categories" in raw:
        if "{category}" not in label:
            raise ValueError(f"{where} ({label!r}): 'categories' needs '{{category}}' in the row label")
        return [RowDecl(label=label.replace("{category}", str(c)), category=str(c), **base)
                for c in raw["categories"]]
    return [RowDecl(label=label, category=raw.get("category"), **base)]
