# Input functions and config helpers (the only place with Python logic; rules map wildcards to
# `anorefiner` arguments).
import copy
import hashlib
import json
import sys
from pathlib import Path


from anorefiner.commands import POS_EMBED_CHOICES

# A feature cache's folder names the backbone key, the resolution and, unless it is the default (antialiased
# bicubic), the position-embedding resize (`vit_l14_336_musc@518-bicubic_no_antialias`): see feature_dir.
_RESIZE_SUFFIXES = "|".join(m for m in POS_EMBED_CHOICES if m != POS_EMBED_CHOICES[0])


wildcard_constraints:
    resize=rf"(-({_RESIZE_SUFFIXES}))?",
    dataset=r"[A-Za-z0-9_]+",
    category=r"[A-Za-z0-9_]+",
    backbone=r"[A-Za-z0-9_]+",
    backend=r"[A-Za-z0-9_]+",
    variant=r"[A-Za-z0-9_]+",
    seed=r"\d+",
    res=r"\d+",
    table=r"(paclip_|demo_)?table\d+",


# The rules run the package from this checkout's src/ (`python -m anorefiner`), so a conda env with
# only the dependencies (workflow/envs/anorefiner.yaml) is enough; an installed package works too.
SRC = str(Path(workflow.current_basedir).parents[1] / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)
# The interpreter running Snakemake has the dependencies (a venv need not be activated); with
# --use-conda the rule's environment provides `python` instead.
_PYTHON = "python" if "conda" in str(workflow.deployment_settings.deployment_method).lower() else sys.executable
# Jobs never fetch weights from the model hub (HF_HUB_OFFLINE): rule `weights` (a local job) puts every
# pretrained file a target needs under resources/weights first, and jobs read it from there.
ANOREFINER = f'HF_HUB_OFFLINE=1 PYTHONPATH="{SRC}${{PYTHONPATH:+:$PYTHONPATH}}" {_PYTHON} -m anorefiner'

# The resolved configuration's hash, recorded in every table's provenance block (docs/audit.md); taken before
# the folder fix-up below so that it does not depend on where the repository is.
CONFIG_SHA256 = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()

# A relative table-declarations folder absent from the working directory (`--directory elsewhere`, e.g.
# the smoke run of config/smoke_paper.yaml) is the repository's own.
_TABLES_DIR = Path(config["tables"]["dir"])
if not _TABLES_DIR.is_absolute() and not _TABLES_DIR.is_dir():
    config["tables"]["dir"] = str(Path(SRC).parent / _TABLES_DIR)

# The library's option sections (ard, pgt, synthesis, variants, backends.*.options) are checked against its
# dataclasses when the workflow loads: a typo fails `snakemake -n` naming the key, not the first job reading it.
from anorefiner.config_check import check_workflow_config, deep_update as _deep_update
from anorefiner.zsad.registry import BACKEND_TYPES, TRAINED_TYPES

check_workflow_config(config)


def dataset_cfg(name):
    try:
        return config["datasets"][name]
    except KeyError:
        raise ValueError(
            f"dataset {name!r} is not configured (datasets: {', '.join(config['datasets'])})"
        ) from None


def dataset_root(name):
    """The MVTec-layout root of a dataset: the user's `root`, else where the download rule puts it."""
    root = dataset_cfg(name).get("root")
    return root if root else f"resources/datasets/{name}"


def dataset_ready(wildcards):
    """The completion marker the rules wait for (nothing when the user points at a folder)."""
    name = wildcards.dataset
    if dataset_cfg(name).get("root"):
        return []
    return f"resources/datasets/{name}/.complete"


def backend_cfg(name):
    try:
        return config["backends"][name]
    except KeyError:
        raise ValueError(
            f"backend {name!r} is not configured (backends: {', '.join(config['backends'])})"
        ) from None


def backbone_cfg(name):
    try:
        return config["backbones"][name]
    except KeyError:
        raise ValueError(
            f"backbone {name!r} is not configured (backbones: {', '.join(config['backbones'])})"
        ) from None


def pretrained_arg(key):
    """`--pretrained` of a backbone: its cached weights file (rule `weights`), a file given by the user, a packaged
    tag, or `none`."""
    from anorefiner.backbones.weights import cache_path, needs_fetch

    bb = backbone_cfg(key)
    pretrained = bb.get("pretrained")
    if needs_fetch(bb["name"], pretrained):
        return str(cache_path(bb["name"], pretrained))
    return str(pretrained) if pretrained is not None else "none"


def weights_input(key):
    """The cached weights file a job on backbone `key` reads (nothing for local files, packaged or random weights)."""
    from anorefiner.backbones.weights import needs_fetch

    bb = backbone_cfg(key)
    return pretrained_arg(key) if needs_fetch(bb["name"], bb.get("pretrained")) else []


def features_weights(wildcards):
    return weights_input(wildcards.backbone)


def backend_weights(wildcards):
    return weights_input(backend_cfg(wildcards.backend)["backbone"])


def weights_source(wildcards):
    """`--model/--pretrained` of rule weights' file (the tag named by the cached file)."""
    return f"--model {wildcards.model} --pretrained {wildcards.tag}"


def feature_dir(key):
    """`<key>@<resolution>[-<pos_embed>]`: the folder of backbone `key`'s feature caches. The position-embedding
    resize is part of it when it is not the default, so a cache made with one resize is never read as another
    (MuSc's official features resize without antialias, backbones.vit_l14_336_musc)."""
    bb = backbone_cfg(key)
    mode = bb.get("pos_embed")
    return f"{key}@{bb['resolution']}" + (f"-{mode}" if mode and mode != POS_EMBED_CHOICES[0] else "")


def features_of(wildcards):
    """The feature cache a backend reads for one category."""
    key = backend_cfg(wildcards.backend)["backbone"]
    return f"results/features/{wildcards.dataset}/{feature_dir(key)}/{wildcards.category}.h5"


def resize_arg(wildcards):
    """`--pos-embed X` for the features job: the resize its output folder names (nothing: the default)."""
    return f"--pos-embed {wildcards.resize[1:]}" if wildcards.resize else ""


def backend_backbone(wildcards):
    return backbone_cfg(backend_cfg(wildcards.backend)["backbone"])


def activation_arg(key):
    """`--activation X` for an open_clip backbone that sets it (the features are checked against it)."""
    act = backbone_cfg(key).get("activation")
    return f"--activation {act}" if act else ""


def pos_embed_arg(key):
    """`--pos-embed X` for an open_clip backbone that sets it (rules building the backbone: tta, train_backend;
    coarse and pgt take it from the feature cache)."""
    mode = backbone_cfg(key).get("pos_embed")
    return f"--pos-embed {mode}" if mode else ""


def backend_options(wildcards):
    """Backend options as JSON, with the dataset's RsCIN neighbourhoods for MuSc."""
    cfg = backend_cfg(wildcards.backend)
    opts = copy.deepcopy(cfg.get("options", {}))
    if cfg["type"] == "musc":
        opts.setdefault("k_list", dataset_cfg(wildcards.dataset).get("rscin_k", [1, 2, 3]))
    kind = BACKEND_TYPES.get(cfg["type"])
    if kind is not None and kind.trainer and backend_checkpoint(wildcards):
        opts["checkpoint"] = backend_checkpoint(wildcards)
    if kind is not None and kind.text_cache:
        opts.setdefault("text_cache", TEXT_CACHE)
    if cfg["type"] == "pad_pam":  # PA-CLIP's modules on top of `base`: its type and filled-in options
        base = _base_wildcards(wildcards)
        opts["base_type"] = backend_cfg(base.backend)["type"]
        opts["base_options"] = json.loads(backend_options(base))
    return json.dumps(opts, sort_keys=True)


# Per-(model, class, prompt set) text embeddings of the CLIP backends (zsad/prompts.py), shared by jobs.
TEXT_CACHE = "results/text"


def auxiliary_dataset(backend, dataset):
    """The dataset whose test split (with masks) trains `backend`'s adapters for scoring `dataset`."""
    aux = backend_cfg(backend).get("auxiliary", {}).get(dataset)
    if not aux:
        raise ValueError(
            f"backends.{backend}.auxiliary has no entry for dataset {dataset!r}: name the dataset whose "
            f"test split trains the adapters (APRIL-GAN: visa for mvtec_ad, mvtec_ad for visa)"
        )
    dataset_cfg(aux)
    return aux


def backend_checkpoint(wildcards):
    """The trained weights a backend reads (APRIL-GAN's adapters, a few-shot method's per-category file, ...), or
    nothing."""
    cfg = backend_cfg(wildcards.backend)
    if cfg["type"] == "pad_pam":
        return backend_checkpoint(_base_wildcards(wildcards))
    if cfg["type"] not in TRAINED_TYPES:
        return []
    scope = BACKEND_TYPES[cfg["type"]].train_scope
    if scope != "auxiliary":
        if fewshot_k(wildcards.backend) == 0:
            return []  # PromptAD with 0 shots: nothing to train
        draw = f"seed{wildcards.seed}" if scope == "shots" else "others"
        return f"results/checkpoints/{wildcards.backend}/{wildcards.dataset}/{wildcards.category}/trained_{draw}.pt"
    source = cfg.get("weights", "trained")
    aux = auxiliary_dataset(wildcards.backend, wildcards.dataset)
    return f"results/checkpoints/{wildcards.backend}/{source}_{aux}.pt"


def fewshot_k(backend):
    """The shots of a few-shot backend (its options' k_shot, else the options dataclass default)."""
    cfg = backend_cfg(backend)
    _, options_cls = BACKEND_TYPES[cfg["type"]].classes()
    return int((cfg.get("options") or {}).get("k_shot", options_cls.k_shot))


def fewshot_args(wildcards):
    """`train-backend` arguments of a few-shot training job: the category, k, and the shots' seed (draw
    `seed<k>`) or the dataset's categories (draw `others`: RegAD trains on all but the scored one)."""
    args = f"--category {wildcards.category} --k-shot {fewshot_k(wildcards.backend)}"
    if wildcards.draw == "others":
        return f"{args} --categories {' '.join(dataset_cfg(wildcards.dataset)['categories'])}"
    return f"{args} --shots-seed {wildcards.draw[len('seed'):]}"


def train_options(wildcards):
    """The training options for this auxiliary (few-shot: scored) dataset (backends.<name>.train.<dataset>) as
    JSON."""
    section = backend_cfg(wildcards.backend).get("train", {})
    return json.dumps(section.get(wildcards.dataset, {}), sort_keys=True)


def official_args(wildcards):
    """`--official ...` for the official checkpoint (a configured source, else the known one)."""
    src = backend_cfg(wildcards.backend).get("official", {}).get(wildcards.dataset)
    if src:
        blob = f" --git-blob {src['git_blob']}" if src.get("git_blob") else ""
        return f"--official '{src['url']}'{blob}"
    return "--official default"


def tta_backend_pattern():
    """Regex of the backends of type `tta` (rule tta's wildcard constraint; matches nothing if none)."""
    import re

    names = [n for n, b in config["backends"].items() if b["type"] == "tta"]
    return "|".join(re.escape(n) for n in names) if names else "(?!x)x"


def tta_base(wildcards):
    """The config name of the backend a `tta` (or `pad_pam`) backend builds on (it must read the same backbone)."""
    cfg = backend_cfg(wildcards.backend)
    base = cfg.get("base")
    if not base:
        raise ValueError(f"backends.{wildcards.backend}: a {cfg['type']} backend needs `base` (the backend it builds on)")
    base_cfg = backend_cfg(base)
    if base_cfg["type"] in ("tta", "pad_pam") or base_cfg["backbone"] != cfg["backbone"]:
        raise ValueError(
            f"backends.{wildcards.backend}: base {base!r} must be a zero-shot backend on the same backbone "
            f"({cfg['backbone']!r}), got type {base_cfg['type']!r} on {base_cfg['backbone']!r}"
        )
    return base


def _base_wildcards(wildcards):
    """Wildcards of the backend a `tta` or `pad_pam` backend builds on."""
    from types import SimpleNamespace

    return SimpleNamespace(backend=tta_base(wildcards), dataset=wildcards.dataset)


def tta_base_options(wildcards):
    """The adapted backend's options (JSON: MuSc's RsCIN neighbourhoods, APRIL-GAN's adapters file)."""
    return backend_options(_base_wildcards(wildcards))


def tta_base_checkpoint(wildcards):
    """The trained weights the adapted backend reads (APRIL-GAN's adapters), or nothing."""
    return backend_checkpoint(_base_wildcards(wildcards))


def tta_options(wildcards):
    """The `tta` section with the backend's own options applied, as JSON (TTAConfig)."""
    base = copy.deepcopy(config.get("tta", {}))
    own = copy.deepcopy(backend_cfg(wildcards.backend).get("options", {}))
    return json.dumps(_deep_update(base, own), sort_keys=True)


def byo_maps(wildcards):
    cfg = backend_cfg(wildcards.backend)
    if cfg["type"] != "byo":
        return []
    return cfg["maps"].format(dataset=wildcards.dataset, category=wildcards.category)


def variant_options(wildcards):
    """The ard/pgt/synthesis sections with the variant's overrides applied, as JSON."""
    return json.dumps(refiner_options_of(wildcards), sort_keys=True)


def textures_arg():
    """`offline`, a folder given by the user, or the downloaded DTD root."""
    kind = config["refine"]["textures"]
    if kind == "dtd":
        return dataset_root("dtd")
    return kind


def textures_ready(wildcards):
    if config["refine"]["textures"] == "dtd" and not config["datasets"]["dtd"].get("root"):
        return "resources/datasets/dtd/.complete"
    return []


def coarse_seed(wildcards):
    """The seed whose coarse store serves run seed `wildcards.seed`: itself, or 0 for a backend whose maps do not
    depend on the seed (computed once, not once per seed; zsad.seed_dependent_backend, with the options of the
    preset the backend is named after, as the coarse and pgt stages build it)."""
    from anorefiner.zsad import seed_dependent_backend

    cfg = backend_cfg(wildcards.backend)
    opts = json.loads(backend_options(wildcards))
    if cfg["type"] == "tta" or seed_dependent_backend(wildcards.backend, cfg["type"], opts):
        return wildcards.seed
    return "0"


def coarse_of(wildcards):
    return f"results/coarse/{wildcards.dataset}/{wildcards.backend}/{wildcards.category}/seed{coarse_seed(wildcards)}.h5"


def metrics_source(wildcards):
    """Variant `coarse` is scored straight from the coarse store; others from the refined store."""
    if wildcards.variant == "coarse":
        return coarse_of(wildcards)
    return (
        f"results/refined/{wildcards.dataset}/{wildcards.backend}/{wildcards.variant}/"
        f"seed{wildcards.seed}/{wildcards.category}.h5"
    )


def gpus(wildcards=None):
    return int(config["compute"]["gpu"])


def device_arg():
    """`--device` of the GPU rules: a job that asked the scheduler for a GPU must get CUDA, so `auto` means
    `cuda` there (the job fails within seconds naming the node's problem instead of running on the CPU)."""
    device = config["compute"]["device"]
    return "cuda" if device == "auto" and gpus() > 0 else device


def table_names():
    from anorefiner.tables.declare import list_tables

    # The demo declarations need the demo dataset; the paper's audit covers the paper's tables.
    names = config["tables"].get("names")
    return names or [t for t in list_tables(config["tables"]["dir"]) if not t.startswith("demo")]


def table_inputs(wildcards):
    """Every metric file the table's rows need (so `snakemake -n tables/X.csv` shows the real DAG)."""
    from anorefiner.tables.declare import load_declaration, required_metric_files

    decl = load_declaration(wildcards.table, config["tables"]["dir"])
    return required_metric_files(decl, config)


def figure_runs():
    return config.get("figures", {}).get("runs", [])


def figure_targets():
    out = []
    for run in figure_runs():
        stem = f"{run['dataset']}/{run['backend']}/{run.get('variant', 'default')}/seed{run.get('seed', 0)}"
        out += [f"figures/{stem}/qualitative.png", f"figures/{stem}/bars.png"]
    return out


def figure_inputs(wildcards):
    """Refined stores and metric files of every category of one (dataset, backend, variant, seed)."""
    cats = dataset_cfg(wildcards.dataset)["categories"]
    stem = f"{wildcards.dataset}/{wildcards.backend}/{wildcards.variant}/seed{wildcards.seed}"
    return {
        "refined": [f"results/refined/{stem}/{c}.h5" for c in cats],
        "metrics": [f"results/metrics/{stem}/{c}.csv" for c in cats]
        + [
            f"results/metrics/{wildcards.dataset}/{wildcards.backend}/coarse/seed{wildcards.seed}/{c}.csv"
            for c in cats
        ],
    }


def default_message():
    """What a bare `snakemake` did (shell-quoted lines of the default rule)."""
    import shlex

    if config["targets"]:
        lines = [f"built the config's targets: {' '.join(config['targets'])}"]
    else:
        lines = [
            "Nothing is built without a target (config `targets` is empty). For example:",
            "  anorefiner plan tables/table1.csv         # jobs, GPU-hours and disk of Table 1, before you run it",
            "  snakemake tables/table1.csv               # Table 1 (needs the datasets and GPUs)",
            "  snakemake all_tables                      # every table and the audit (tables/audit.md)",
            "  snakemake --workflow-profile profiles/demo  # the offline CPU demo (minutes)",
        ]
    return " ".join(shlex.quote(line) for line in lines)


# ------------------------------------------------------------------ SeaS (Table 5 (c), docs/seas.md)
def seas_weights():
    """The Stable Diffusion folder SeaS fine-tunes: the pinned hub model's cache (rule sd_weights) or the
    user's folder (config seas.weights)."""
    from anorefiner.seas.fetch import PINNED, cache_dir

    name = config["seas"]["weights"]
    if name in PINNED:
        return str(cache_dir(name))
    if not Path(name).is_dir():
        raise ValueError(
            f"seas.weights: {name!r} is neither a pinned model ({', '.join(PINNED)}) nor a folder (a Stable "
            "Diffusion model in diffusers layout)"
        )
    return name


def seas_weights_input(wildcards):
    return seas_weights()


def seas_options(wildcards):
    """SeaSConfig of the dataset (seas.options + seas.datasets.<dataset>) as JSON."""
    from anorefiner.config_check import seas_options as merged

    return json.dumps(merged(config, wildcards.dataset), sort_keys=True)


def uses_seas(wildcards):
    return refiner_options_of(wildcards)["synthesis"].get("method") == "seas"


def refiner_options_of(wildcards):
    from anorefiner.config_check import refiner_options

    return refiner_options(config, wildcards.variant)


def seas_model(wildcards):
    return f"results/seas/{wildcards.dataset}/{wildcards.category}"


def seas_inputs(wildcards):
    """What PGT with SeaS's pseudo-anomalies reads: the category's SeaS model and the weights it was tuned from."""
    return [seas_model(wildcards), seas_weights()] if uses_seas(wildcards) else []


def seas_arg(wildcards):
    return f"--seas-model {seas_model(wildcards)}" if uses_seas(wildcards) else ""
