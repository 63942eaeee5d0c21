"""``anorefiner plan``: what a Snakemake target costs before it is submitted (jobs, GPU-hours, disk).

The jobs come from Snakemake itself (``snakemake -n`` on the repository's workflow: the exact DAG the run
would execute, with each job's wildcards and declared resources); nothing here re-derives the DAG. Each
job is then priced with per-stage rates: ``plan_rates.yaml`` beside this module (versioned, documented
defaults for a GPU and for 2 CPU cores), or the figures of ``benchmarks/gpu_check.py`` (``--rates
gpu_check.json``). The cost model per job (``n`` = test images of its category, from the dataset on disk,
the demo generator or the published counts):

- features: ``n`` forward passes; disk ``n x grid^2 x channels`` (``features.dtype``) plus class tokens;
- coarse (MuSc): one distance block per ordered image pair of each group (whole set, or MuSc*'s groups);
- pgt: per trained group ``min(r, |group|) x l`` pseudo-anomalies (synthesis + features + MuSc map against
  the group) and ``epochs`` passes over them; then every image is refined; disk: three float16 maps at
  ``refine.eval_resolution`` (an upper bound: the stores are gzip-compressed, 2.7x smaller in the smoke run);
- tta: the base method's coarse cost plus ``n`` x the method's passes (``tta.image_factor`` forwards);
- train_backend: auxiliary test images x epochs x the type's factor of a forward;
- train_seas: both SeaS stages, ``steps_per_defect_type`` optimiser steps per defect type each; pgt of a variant with
  ``synthesis.method: seas`` generates its pseudo-anomalies with the SeaS model (``seas`` rates);
- train_fewshot (PromptAD, MVFA-AD, RegAD, per scored category): the images one epoch sees (the k shots;
  MVFA-AD's 11 views of each; RegAD's queries with their k supports over the other categories' train/good
  images) x epochs x the type's factor of a forward, plus decoding them once;
- metrics (CPU); download, weights, sd_weights and official_checkpoint: bytes / ``download_mb_per_s``; the
  rest negligible.

Rules priced from rates not measured on the device (``measured`` in plan_rates.yaml) are marked ``*``.

Times are in hours of the device the rates are for: "GPU-hours" for jobs that request a GPU
(``resources: gpu``), CPU-hours for the others.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

NAME = "plan"
HELP = "list the jobs a Snakemake target needs, with estimated GPU-hours and disk (before you submit it)"

RATES_FILE = Path(__file__).with_name("plan_rates.yaml")
REF_RESOLUTION = 518  # the rates' reference resolution (ARD, refinement, metrics)
# Feature geometry: input pixels per token, channels per selected layer (default layers), class-token width.
GEOMETRY = {
    "ViT-L-14-336": {"stride": 14, "channels_per_layer": 1024, "cls": 1024},
    "resnet50": {"stride": 8, "channels": 512 + 1024, "cls": 0},  # layer2 + layer3 (Table 8)
    "resnet18": {"stride": 4, "channels": 64, "cls": 0},  # layer1 (RegAD: the cache only gives the image ids)
    "ViT-B-16-plus-240": {"stride": 16, "channels_per_layer": 896, "cls": 896},  # WinCLIP, PromptAD
    "efficientnet_lite0": {"stride": 8, "channels": 40 + 112, "cls": 0},  # blocks.2 + blocks.4 (backbones/cnn.py)
}
# Rules with a cost model; table, audit, figures and the default target cost seconds and kilobytes.
PRICED = {"features", "coarse", "pgt", "metrics", "download", "demo_data", "table", "audit", "figures", "default",
          "train_backend", "train_fewshot", "tta", "weights", "official_checkpoint", "all_tables", "train_seas",
          "sd_weights"}
# Rows in pipeline order (Snakemake's dry run lists jobs in no fixed order).
STAGE_ORDER = ["download", "demo_data", "weights", "sd_weights", "official_checkpoint", "features",
               "train_backend", "train_fewshot", "train_seas", "coarse", "tta", "pgt", "metrics", "table", "audit",
               "figures", "all_tables", "default"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="*", help="Snakemake targets, e.g. tables/table1.csv (default: config targets)")
    p.add_argument("--configfile", nargs="+", default=None,
                   help="config file(s) merged over the workflow's config/config.yaml, as Snakemake does")
    p.add_argument("--replace-workflow-config", action="store_true",
                   help="the --configfile replaces config/config.yaml (e.g. config/demo.yaml), as in Snakemake")
    p.add_argument("--snakefile", default="Snakefile", help="the repository's root Snakefile")
    p.add_argument("--directory", default=".", help="Snakemake working directory (where results/ would go)")
    p.add_argument("--all", action="store_true",
                   help="price every job of the target (--forceall), not only those whose outputs are missing")
    p.add_argument("--rates", default=None,
                   help="a gpu_check JSON (benchmarks/gpu_check.py) or a rates YAML replacing plan_rates.yaml")
    p.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto",
                   help="which rates to use (auto: gpu when the config's compute.gpu > 0)")
    p.add_argument("--json", default=None, help="also write the plan (per job and per rule) as JSON here")


# --------------------------------------------------------------------------------------- Snakemake's DAG
@dataclass
class Job:
    rule: str
    wildcards: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)
    output: list = field(default_factory=list)


def dry_run(targets, snakefile: str, directory: str, configfiles: list[str], replace: bool, forceall: bool) -> str:
    """The text of ``snakemake -n`` (every job it would run, with wildcards and resources)."""
    cmd = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(snakefile), "--directory", str(directory),
           "--cores", "1", "--workflow-profile", "none"]
    if forceall:
        cmd.append("--forceall")
    cmd += list(targets)
    if configfiles:
        cmd += ["--configfile", *map(str, configfiles)] + (["--replace-workflow-config"] if replace else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise ValueError(f"snakemake -n {' '.join(targets)} failed ({proc.returncode}):\n{snakemake_error(text)}")
    return text


def snakemake_error(text: str, limit: int = 3000) -> str:
    """Snakemake's error from its output: from the first ``...Error``/``...Exception`` line on, without the JSON
    schema that a validation error dumps (its message and the ``On instance[...]`` key stay)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"^\w*(Error|Exception)\b", line)), None)
    if start is None:
        return text[-limit:]
    kept, in_schema = [], False
    for line in lines[start:]:
        if line.startswith("Failed validating"):
            kept.append(line.split(" in schema")[0])
            in_schema = True
        elif in_schema and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        else:
            in_schema = False
            kept.append(line)
    return "\n".join(kept)[:limit]


def _fields(text: str) -> dict:
    out = {}
    for part in text.split(", "):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def parse_jobs(text: str) -> list[Job]:
    """Jobs of a ``snakemake -n`` listing (``rule X:`` / ``localrule X:`` blocks)."""
    jobs: list[Job] = []
    for line in text.splitlines():
        head = re.match(r"^(?:local)?rule (\w+):\s*$", line)
        if head:
            jobs.append(Job(head.group(1)))
            continue
        item = re.match(r"^    (\w+): (.*)$", line)
        if item and jobs:
            key, value = item.groups()
            if key == "wildcards":
                jobs[-1].wildcards = _fields(value)
            elif key == "resources":
                jobs[-1].resources = _fields(value)
            elif key == "output":
                jobs[-1].output = value.split(", ")
    return jobs


def parse_job_stats(text: str) -> dict[str, int]:
    """Snakemake's own "Job stats" table (``rule count``), without the total."""
    block = text.split("Job stats:", 1)[1] if "Job stats:" in text else ""
    counts = {}
    for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", block.split("\n\n\n", 1)[0], re.M):
        if m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


# --------------------------------------------------------------------------------------- rates
def load_rates(path: str | None = None) -> dict:
    """plan_rates.yaml, with a gpu_check JSON's figures replacing its device's defaults (or a whole YAML)."""
    import yaml

    rates = yaml.safe_load(RATES_FILE.read_text())
    if not path:
        return rates
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--rates {path}: no such file")
    if p.suffix in (".yaml", ".yml"):
        return yaml.safe_load(p.read_text())
    try:
        check = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--rates {path}: not JSON ({err})") from err
    return rates_from_gpu_check(rates, check, str(p))


def rates_from_gpu_check(rates: dict, check: dict, where: str) -> dict:
    """Replace the defaults of the device a gpu_check summary ran on with its measured rates."""
    if check.get("schema") != "anorefiner-gpu-check/1":
        raise ValueError(f"{where}: not a benchmarks/gpu_check.py summary (schema {check.get('schema')!r})")
    rates = copy.deepcopy(rates)
    kind = "gpu" if str(check.get("device", "")).startswith("cuda") else "cpu"
    dev = rates["devices"][kind]
    dev["source"] = f"{where} ({check.get('device_name', check.get('device'))}, quick={check.get('quick')})"
    feats, musc, pgt = check.get("features", {}), check.get("musc", {}), check.get("pgt", {})
    vit = dev["backbones"].setdefault("ViT-L-14-336", {"resolution": REF_RESOLUTION, "layers": 4})
    scale_px = (REF_RESOLUTION / feats.get("resolution", REF_RESOLUTION)) ** 2
    if feats.get("img_per_s"):
        # float32 forward (the features rule's path); image decoding runs ahead in a worker thread, so the
        # slower of the two sets the pace
        vit["features_s_per_image"] = max(scale_px / float(feats["img_per_s"]),
                                          float(feats.get("preprocess_s_per_image") or 0.0))
    if musc.get("seconds") and musc.get("n_images"):
        # a pair costs tokens^2 x channels x layers: scale the measured geometry to 37^2 x 1024 x 4
        tokens = (REF_RESOLUTION // 14) ** 2 / float(musc["grid"]) ** 2
        n = int(musc["n_images"])
        vit["musc_s_per_pair"] = (float(musc["seconds"]) / (n * (n - 1)) * tokens ** 2
                                  * 1024 / float(musc["channels"]) * 4 / float(musc["layers"]))
    t = pgt.get("timings") or {}
    dev["measured"] = sorted(set(dev.get("measured", [])) | {k for k, v in (("features", feats.get("img_per_s")),
                                                                           ("coarse", musc.get("seconds")),
                                                                           ("pgt", t)) if v})
    if t and pgt.get("n_pseudo_anomalies"):
        px = (REF_RESOLUTION / float(pgt["resolution"])) ** 2
        q = float(pgt["n_pseudo_anomalies"])
        dev["pgt"]["train_s_per_sample_epoch"] = float(t["train_s"]) / (q * float(pgt["epochs"])) * px
        dev["pgt"]["refine_s_per_image"] = float(t["refine_s"]) / float(pgt["n_images"]) * px
        # run_pgt's synthesis_s also holds the pseudo-anomalies' features and MuSc maps, priced separately
        make = float(t["synthesis_s"]) / q * px - vit["features_s_per_image"] \
            - float(pgt["group_size"]) * vit["musc_s_per_pair"]
        dev["pgt"]["make_s_per_pseudo_anomaly"] = max(make, 0.0)
    return rates


# --------------------------------------------------------------------------------------- cost model
def count_test_images(config: dict, dataset: str, category: str, directory: Path, rates: dict) -> int:
    ds = (config.get("datasets") or {}).get(dataset) or {}
    root = Path(ds.get("root") or directory / "resources" / "datasets" / dataset)
    test = root / category / "test"
    if test.is_dir():
        n = sum(1 for f in test.glob("*/*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if n:
            return n
    if ds.get("format") == "demo":
        return int((ds.get("generator") or {}).get("n_test", 60))
    try:
        return int(rates["test_images"][dataset][category])
    except KeyError:
        raise ValueError(f"plan: unknown size of {dataset}/{category}: not on disk under {root} and not in "
                         f"{RATES_FILE.name} test_images") from None


class CostModel:
    """Seconds and bytes of one job under a config and a device's rates (module docstring)."""

    def __init__(self, config: dict, rates: dict, device: str, directory: Path):
        self.config, self.rates, self.directory = config, rates, directory
        self.dev = rates["devices"][device]
        self.notes: list[str] = []

    def n(self, wc) -> int:
        return count_test_images(self.config, wc["dataset"], wc["category"], self.directory, self.rates)

    def backbone(self, key: str) -> dict:
        return self.config["backbones"][key]

    def rate(self, bb: dict) -> dict:
        name = bb["name"]
        table = self.dev["backbones"]
        if name not in table:
            note = f"no rates for backbone {name!r}: those of ViT-L-14-336 used"
            if note not in self.notes:
                self.notes.append(note)
            return table["ViT-L-14-336"]
        return table[name]

    def scales(self, bb: dict) -> tuple[float, float]:
        """(per-image factor, per-pair factor) of a backbone config against its rates' reference."""
        r = self.rate(bb)
        px = (int(bb["resolution"]) / r["resolution"]) ** 2
        layers = len(bb.get("layers") or []) or r["layers"]
        return px, px * px * layers / r["layers"]

    def feature_bytes(self, bb: dict) -> float:
        geo = GEOMETRY.get(bb["name"], GEOMETRY["ViT-L-14-336"])
        grid = math.ceil(int(bb["resolution"]) / geo["stride"]) ** 2
        if "channels_per_layer" in geo:
            channels = geo["channels_per_layer"] * (len(bb.get("layers") or []) or 4)
        else:
            channels = geo["channels"]
        item = 2 if (self.config.get("features") or {}).get("dtype", "float16") == "float16" else 4
        return grid * channels * item + 4 * geo["cls"]

    def grid(self, bb: dict) -> int:
        return math.ceil(int(bb["resolution"]) / GEOMETRY.get(bb["name"], GEOMETRY["ViT-L-14-336"])["stride"]) ** 2

    def cost(self, job: Job) -> tuple[float, float]:
        wc, d = job.wildcards, self.dev
        if job.rule == "features":
            bb = self.backbone(wc["backbone"])
            n = self.n(wc)
            return (d["features_job_overhead_s"] + n * self.rate(bb)["features_s_per_image"] * self.scales(bb)[0],
                    n * self.feature_bytes(bb))
        if job.rule == "coarse":
            cfg = self.config["backends"][wc["backend"]]
            bb, n = self.backbone(cfg["backbone"]), self.n(wc)
            disk = n * (self.grid(bb) * 4 + 4)
            if cfg["type"] == "musc":
                from ..zsad.groups import make_groups

                pairs = sum(len(g) * (len(g) - 1) for g in make_groups(n, (cfg.get("options") or {}).get("group_size")))
                return d["coarse_job_overhead_s"] + pairs * self.rate(bb)["musc_s_per_pair"] * self.scales(bb)[1], disk
            if cfg["type"] == "paclip":
                return d["coarse_job_overhead_s"] + n * d["paclip_s_per_image"] * self.scales(bb)[0], disk
            factor = float(d.get("coarse_image_factor", {}).get(cfg["type"], 0.0))
            per_image = self.rate(bb)["features_s_per_image"] * self.scales(bb)[0] * factor
            return d["coarse_job_overhead_s"] + n * per_image, disk
        if job.rule == "pgt":
            return self.pgt(wc)
        if job.rule == "train_backend":
            return self.train_backend(wc)
        if job.rule == "train_seas":
            return self.train_seas(wc)
        if job.rule == "train_fewshot":
            return self.train_fewshot(wc)
        if job.rule == "metrics":
            e = (self.config.get("evaluation") or {}).get("resolution") or REF_RESOLUTION
            return self.n(wc) * d["metrics_s_per_image"] * (e / REF_RESOLUTION) ** 2, self.rates["metric_file_bytes"]
        if job.rule == "tta":
            return self.tta(job)
        if job.rule in ("download", "weights", "sd_weights", "official_checkpoint"):
            return self.download(job)
        if job.rule not in PRICED:
            note = f"rule {job.rule!r} has no rate in {RATES_FILE.name}: its jobs are counted, not priced"
            if note not in self.notes:
                self.notes.append(note)
            return 0.0, 0.0
        if job.rule == "demo_data":
            ds = self.config["datasets"]["demo"]
            gen = ds.get("generator") or {}
            images = len(ds.get("categories", [])) * (gen.get("n_train", 20) + 2 * gen.get("n_test", 60))
            return 0.0, images * 3 * gen.get("image_size", 256) ** 2 / 2  # PNG: about half the raw bytes
        return 0.0, 0.0

    def download(self, job: Job) -> tuple[float, float]:
        """Bytes fetched (datasets' archive + extraction, a backbone's weights, a trained backend's official file)
        at the rates' download bandwidth."""
        wc = job.wildcards
        if job.rule == "download":
            size = float(self.rates["download_bytes"].get(wc.get("dataset", ""), 0.0))
        elif job.rule in ("weights", "sd_weights"):
            size = float(self.rates.get("weights_bytes", {}).get(wc.get("model", ""), 0.0))
        else:
            kind = self.config["backends"][wc["backend"]]["type"]
            size = float(self.rates.get("checkpoint_bytes", {}).get(kind, 0.0))
        return size / (float(self.rates["download_mb_per_s"]) * 1e6), size

    def tta(self, job: Job) -> tuple[float, float]:
        """A TTA baseline: its base method's coarse cost plus the method's passes per image (``tta`` rates)."""
        wc = job.wildcards
        cfg = self.config["backends"][wc["backend"]]
        seconds, disk = self.cost(Job("coarse", dict(wc, backend=cfg["base"])))
        rates = self.dev["tta"]
        factor = rates["image_factor"].get(str(cfg.get("method")))
        if factor is None:
            note = f"TTA method {cfg.get('method')!r} has no tta image_factor in {RATES_FILE.name}: priced as its base"
            if note not in self.notes:
                self.notes.append(note)
            return seconds, disk
        bb = self.backbone(cfg["backbone"])
        per_image = self.rate(bb)["features_s_per_image"] * self.scales(bb)[0] * float(factor)
        return seconds + rates["job_overhead_s"] + self.n(wc) * per_image, disk

    def train_backend(self, wc) -> tuple[float, float]:
        """Training on the auxiliary dataset's test split: images x epochs x the type's factor of a forward;
        an official checkpoint only downloads (``checkpoint_bytes``)."""
        from ..config import from_dict
        from ..zsad.registry import backend_type

        cfg = self.config["backends"][wc["backend"]]
        size = float(self.rates.get("checkpoint_bytes", {}).get(cfg["type"], 0.0))
        if wc.get("source") == "official":
            return 0.0, size
        train = self.dev["train_backend"]
        factor = train["image_epoch_factor"].get(cfg["type"])
        if factor is None:
            note = f"backend type {cfg['type']!r} has no train_backend factor in {RATES_FILE.name}: not priced"
            if note not in self.notes:
                self.notes.append(note)
            return 0.0, size
        aux = wc["dataset"]
        categories = (self.config.get("datasets") or {}).get(aux, {}).get("categories") or []
        n = sum(count_test_images(self.config, aux, c, self.directory, self.rates) for c in categories)
        options = (cfg.get("train") or {}).get(aux, {})
        epochs = int(from_dict(backend_type(cfg["type"]).trainer_module().TrainConfig, options).epochs)
        bb = self.backbone(cfg["backbone"])
        per_image = self.rate(bb)["features_s_per_image"] * self.scales(bb)[0] * float(factor)
        return train["job_overhead_s"] + n * epochs * per_image, size

    def defect_types(self, dataset: str, category: str) -> int:
        """Defect folders of a category's test split (on disk, else ``defect_types`` of the rates)."""
        ds = (self.config.get("datasets") or {}).get(dataset) or {}
        test = Path(ds.get("root") or self.directory / "resources" / "datasets" / dataset) / category / "test"
        if test.is_dir():
            found = [p for p in test.iterdir() if p.is_dir() and p.name != "good"]
            if found:
                return len(found)
        return int(self.rates.get("defect_types", {}).get(dataset, {}).get(category, 1))

    def train_seas(self, wc) -> tuple[float, float]:
        """Both SeaS stages: ``steps_per_defect_type`` x defect types optimiser steps each (``seas`` rates)."""
        from ..config_check import seas_config

        rates = self.dev["seas"]
        steps = seas_config(self.config, wc["dataset"]).steps_per_defect_type * self.defect_types(
            wc["dataset"], wc["category"])
        return (rates["job_overhead_s"] + steps * (rates["generation_s_per_step"] + rates["mask_s_per_step"]),
                float(self.rates["seas_model_bytes"]))

    def train_fewshot(self, wc) -> tuple[float, float]:
        """A few-shot method's training for one category: the images of an epoch x epochs x the type's factor of a
        forward, plus one forward-equivalent per distinct image (decoding); ``checkpoint_bytes`` on disk."""
        from ..config import from_dict
        from ..zsad.registry import backend_type

        cfg = self.config["backends"][wc["backend"]]
        kind = backend_type(cfg["type"])
        size = float(self.rates.get("checkpoint_bytes", {}).get(cfg["type"], 0.0))
        factor = self.dev.get("train_fewshot", {}).get("image_epoch_factor", {}).get(cfg["type"])
        if factor is None:
            note = f"backend type {cfg['type']!r} has no train_fewshot factor in {RATES_FILE.name}: not priced"
            if note not in self.notes:
                self.notes.append(note)
            return 0.0, size
        _, options_cls = kind.classes()
        k = int((cfg.get("options") or {}).get("k_shot", options_cls.k_shot))
        train = from_dict(kind.trainer_module().TrainConfig, (cfg.get("train") or {}).get(wc["dataset"], {}))
        if kind.train_scope == "others":  # every query image with its k supports
            counts = self.rates.get("train_images", {}).get(wc["dataset"], {})
            others = [c for c in self.config["datasets"][wc["dataset"]]["categories"] if c != wc["category"]]
            distinct = sum(int(counts.get(c, 0)) for c in others)
            per_epoch = distinct * (1 + k)
        else:
            distinct = k
            per_epoch = k * int(self.dev["train_fewshot"].get("views", {}).get(cfg["type"], 1))
        bb = self.backbone(cfg["backbone"])
        forward = self.rate(bb)["features_s_per_image"] * self.scales(bb)[0]
        images = distinct + per_epoch * int(train.epochs) * factor
        return self.dev["train_fewshot"]["job_overhead_s"] + images * forward, size

    def pgt(self, wc) -> tuple[float, float]:
        from ..config_check import refiner_options
        from ..refine.pgt import PGTConfig
        from ..zsad.groups import make_groups

        cfg = self.config["backends"][wc["backend"]]
        bb, n, d = self.backbone(cfg["backbone"]), self.n(wc), self.dev
        px, pair = self.scales(bb)
        rate = self.rate(bb)
        variant = (self.config.get("variants") or {}).get(wc["variant"]) or {}
        opts = {**(self.config.get("pgt") or {}), **(variant.get("pgt") or {})}
        defaults = PGTConfig()
        get = lambda key: opts.get(key, getattr(defaults, key))  # noqa: E731
        groups = make_groups(n, int(get("group_size")))
        trained = groups if get("train_last_group") else groups[:-1]
        if get("schedule") == "one_group":
            trained = trained[:1]
        seconds = d["pgt"]["job_overhead_s"] + n * d["pgt"]["refine_s_per_image"] * px
        make = d["pgt"]["make_s_per_pseudo_anomaly"] * px
        if refiner_options(self.config, wc["variant"])["synthesis"].get("method") == "seas":
            make = d["seas"]["generate_s_per_image"]  # at SeaS's own resolution
            seconds += d["seas"]["job_overhead_s"]
        for k, g in enumerate(trained):
            q = min(int(get("n_pseudo_normal")), len(g)) * int(get("n_anomalies_per_normal"))
            if not (get("schedule") == "same_anomalies" and k > 0):
                seconds += q * (make + rate["features_s_per_image"] * px + len(g) * rate["musc_s_per_pair"] * pair)
            seconds += q * int(get("epochs")) * d["pgt"]["train_s_per_sample_epoch"] * px
        e = int((self.config.get("refine") or {}).get("eval_resolution", REF_RESOLUTION))
        return seconds, n * (3 * e * e * 2 + 12)


# --------------------------------------------------------------------------------------- report
def load_config(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"plan: config file {path} does not exist")
    return yaml.safe_load(path.read_text()) or {}


def make_plan(jobs: list[Job], model: CostModel) -> list[dict]:
    rows: dict[str, dict] = {}
    for job in jobs:
        seconds, disk = model.cost(job)
        gpu = int(job.resources.get("gpu", 0) or 0) > 0
        limit = float(job.resources["runtime"]) if "runtime" in job.resources else math.nan
        r = rows.setdefault(job.rule, {"rule": job.rule, "jobs": 0, "on": "gpu" if gpu else "cpu", "hours": 0.0,
                                       "longest_job_min": 0.0, "runtime_limit_min": limit, "over_limit": 0,
                                       "disk_bytes": 0.0,
                                       "estimate": job.rule not in model.dev.get("measured", [])})
        r["jobs"] += 1
        r["hours"] += seconds / 3600
        r["longest_job_min"] = max(r["longest_job_min"], seconds / 60)
        r["over_limit"] += int(seconds / 60 > limit)
        r["disk_bytes"] += disk
    return sorted(rows.values(), key=lambda r: (STAGE_ORDER.index(r["rule"]) if r["rule"] in STAGE_ORDER
                                                else len(STAGE_ORDER), r["rule"]))


def _size(b: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if b < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    return ""


def format_plan(rows: list[dict], header: str, notes: list[str]) -> str:
    lines = [header, "", f"{'rule':<15}{'jobs':>6}  {'on':<4}{'est. hours':>11}{'longest job':>13}"
             f"{'limit':>9}{'disk':>11}", "-" * 69]
    for r in rows:
        limit = "-" if math.isnan(r["runtime_limit_min"]) else f"{r['runtime_limit_min']:.0f} min"
        name = r["rule"] + ("*" if r.get("estimate") and r["hours"] > 0 else "")
        lines.append(f"{name:<15}{r['jobs']:>6}  {r['on']:<4}{r['hours']:>11.2f}"
                     f"{r['longest_job_min']:>9.1f} min{limit:>9}{_size(r['disk_bytes']):>11}")
    gpu_h = sum(r["hours"] for r in rows if r["on"] == "gpu")
    cpu_h = sum(r["hours"] for r in rows if r["on"] == "cpu")
    lines += ["-" * 69, f"total: {sum(r['jobs'] for r in rows)} jobs, {gpu_h:.2f} GPU-hours, {cpu_h:.2f} CPU-hours, "
              f"{_size(sum(r['disk_bytes'] for r in rows))} on disk"]
    over = [f"{r['rule']} ({r['over_limit']})" for r in rows if r["over_limit"]]
    if over:
        lines.append("WARNING: estimated jobs longer than their rule's runtime limit: " + ", ".join(over)
                     + " -- raise `runtime` under set-resources in the SLURM profile")
    if any(r.get("estimate") and r["hours"] > 0 for r in rows):
        lines.append("* estimated rates, not measured on this device (plan_rates.yaml says how each was derived)")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def main(args) -> int:
    from ..io import write_json_atomic
    from ..log import LOG

    from ..config import ConfigError
    from ..config_check import deep_update

    directory = Path(args.directory)
    snakefile = Path(args.snakefile)
    # Snakemake's merge: config/config.yaml, then each --configfile over it (unless --replace-workflow-config).
    # Passed to Snakemake as that list with --replace-workflow-config: the same config, from any --directory.
    base = [] if args.replace_workflow_config and args.configfile else [snakefile.resolve().parent / "config" / "config.yaml"]
    configfiles = [Path(p).resolve() for p in base + list(args.configfile or [])]
    config: dict = {}
    for path in configfiles:
        extra = load_config(path)
        if extra.get("standalone") and not args.replace_workflow_config:
            raise ConfigError(f"plan: {path} is a whole configuration (standalone: true), not additions to "
                              f"config/config.yaml: add --replace-workflow-config")
        deep_update(config, extra)
    config_label = " + ".join(args.configfile) if args.configfile else "config/config.yaml"
    if args.replace_workflow_config and args.configfile:
        config_label += " (replacing config/config.yaml)"
    rates = load_rates(args.rates)
    device = args.device
    if device == "auto":
        device = "gpu" if int((config.get("compute") or {}).get("gpu", 1)) > 0 else "cpu"
    targets = list(args.targets)  # none: Snakemake's default target (config `targets`)
    LOG.info("asking Snakemake for the jobs of %s (snakemake -n%s)", " ".join(targets) or "the default target",
             " --forceall" if args.all else "")
    text = dry_run(targets, str(snakefile), str(directory), [str(p) for p in configfiles], True, args.all)
    jobs = parse_jobs(text)
    stats = parse_job_stats(text)
    counts = {}
    for job in jobs:
        counts[job.rule] = counts.get(job.rule, 0) + 1
    if counts != stats:
        raise ValueError(f"plan: parsed jobs {counts} differ from Snakemake's job stats {stats}")
    model = CostModel(config, rates, device, directory)
    rows = make_plan(jobs, model)
    header = (f"Plan for {' '.join(targets) or 'the default target'} ({config_label}; "
              f"{'every job' if args.all else 'jobs whose outputs are missing'}; "
              f"rates for {device}: {rates['devices'][device]['source']})")
    print(format_plan(rows, header, model.notes) if jobs else header + "\n\nNothing to be done.")
    if args.json:
        write_json_atomic(args.json, {"targets": targets, "config": config_label, "device": device,
                                      "rates_source": rates["devices"][device]["source"], "rules": rows,
                                      "jobs": [{"rule": j.rule, "wildcards": j.wildcards} for j in jobs],
                                      "notes": model.notes})
    return 0
