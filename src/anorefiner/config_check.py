"""Check the workflow configuration's option sections against the library's dataclasses, at load time.

The JSON schema (workflow/schemas/config.schema.yaml) checks the workflow's own keys; the option
sections that the library reads — ``ard``, ``pgt``, ``synthesis``, every ``variants.<name>`` and every
``backends.<name>.options`` — are checked here by building the dataclasses that will read them
(:func:`anorefiner.config.from_dict`), so their keys are always the dataclasses' current fields. A typo
such as ``pgt: {epochz: 3}`` then fails ``snakemake -n`` naming the key, not the first PGT job hours later.
Called from workflow/rules/common.smk.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib

from .config import ConfigError, from_dict

REFINER_SECTIONS = ("ard", "pgt", "synthesis")


def deep_update(base: dict, extra: dict) -> dict:
    """Merge ``extra`` into ``base`` in place (nested mappings merged key by key); returns ``base``."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def refiner_options(config: dict, variant: str | None = None) -> dict:
    """The ``ard``/``pgt``/``synthesis`` sections with variant ``variant``'s overrides applied."""
    base = {k: copy.deepcopy(config.get(k) or {}) for k in REFINER_SECTIONS}
    if variant is None:
        return base
    variants = config.get("variants") or {}
    if variant not in variants:
        raise ConfigError(f"variant {variant!r} is not configured (variants: {', '.join(variants)})")
    overrides = variants[variant] or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"variants.{variant} must be a mapping of sections {REFINER_SECTIONS}, got {overrides!r}")
    unknown = sorted(set(overrides) - set(REFINER_SECTIONS))
    if unknown:
        raise ConfigError(f"variants.{variant}: unknown section(s) {unknown}; a variant overrides "
                          f"{', '.join(REFINER_SECTIONS)}")
    for section, values in overrides.items():
        if not isinstance(values, dict):
            raise ConfigError(f"variants.{variant}.{section} must be a mapping, got {values!r}")
    return deep_update(base, copy.deepcopy(overrides))


def _refiner(data: dict, where: str):
    from .refine.pgt import RefinerOptions

    for section in REFINER_SECTIONS:
        if not isinstance(data.get(section), dict):
            raise ConfigError(f"{where + '.' if where else ''}{section} must be a mapping, got {data.get(section)!r}")
    try:
        options = from_dict(RefinerOptions, data, where)
        options.validate()
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or 'refiner sections'}: {err}") from err
    return options


def options_class(kind: str):
    """The dataclass that reads ``backends.<name>.options`` of backend type ``kind``: the one ``*Config``
    dataclass of ``anorefiner.zsad.<kind>`` (zero-shot backends) or of ``anorefiner.<kind>`` (e.g. ``tta``);
    None when there is none (the type's own rule then reads its options)."""
    for module_name in (f"anorefiner.zsad.{kind}", f"anorefiner.{kind}"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue
            raise
        found = [obj for name, obj in vars(module).items()
                 if name.endswith("Config") and isinstance(obj, type) and dataclasses.is_dataclass(obj)
                 and obj.__module__.startswith(module_name)]
        if len(found) == 1:
            return found[0]
    return None


def check_backend(name: str, cfg: dict, config: dict | None = None) -> None:
    """``backends.<name>.options``: keys (and values the dataclass checks) of the type's options dataclass.

    A top-level section named like the type (``tta``) holds defaults that the options override."""
    from .zsad import preset_options

    if not isinstance(cfg, dict):
        raise ConfigError(f"backends.{name} must be a mapping, got {cfg!r}")
    kind = str(cfg.get("type"))
    options = cfg.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"backends.{name}.options must be a mapping, got {options!r}")
    cls = options_class(kind)
    if cls is None:
        return
    where = f"backends.{name}.options"
    shared = (config or {}).get(kind)
    base = copy.deepcopy(shared) if isinstance(shared, dict) else {}
    preset = preset_options(name, kind)
    opts = deep_update({**base, **copy.deepcopy(preset)}, copy.deepcopy(options))
    try:
        built = from_dict(cls, opts, where)
        nested = getattr(built, "musc", None)
        if kind == "byo" and nested is not None:  # BYO's MuSc proxy scores PGT's pseudo-anomalies
            from .zsad.musc.backend import MuscConfig

            if not isinstance(nested, dict):
                raise ConfigError(f"{where}.musc must be a mapping, got {nested!r}")
            from_dict(MuscConfig, nested, f"{where}.musc")
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


# Training options that must be positive (an epoch count of 0 or less would save untrained weights).
_POSITIVE = ("epochs", "batch_size", "lr")


def check_training(name: str, cfg: dict) -> None:
    """``backends.<name>.train.<aux>`` against the trainer's ``TrainConfig`` (keys, positive counts), and the
    official checkpoint's source when ``weights: official``."""
    from .zsad.registry import BACKEND_TYPES

    kind = BACKEND_TYPES.get(str(cfg.get("type")))
    if kind is None or not kind.trainer:
        return
    trainer = kind.trainer_module()
    for aux, options in (cfg.get("train") or {}).items():
        where = f"backends.{name}.train.{aux}"
        if not isinstance(options, dict):
            raise ConfigError(f"{where} must be a mapping, got {options!r}")
        try:
            built = from_dict(trainer.TrainConfig, options, where)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: {err}") from err
        for key in _POSITIVE:
            value = getattr(built, key, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
                raise ConfigError(f"{where}.{key} must be > 0, got {value!r}")
    if cfg.get("weights", "trained") == "official" and kind.train_scope != "auxiliary":
        raise ConfigError(f"backends.{name}.weights: official: no official {cfg['type']} checkpoint is published with "
                          f"a checksum (docs/backends.md); it is trained per category by rule train_fewshot")
    if cfg.get("weights", "trained") == "official":
        for aux in sorted(set((cfg.get("auxiliary") or {}).values())):
            _check_official(name, str(cfg["type"]), aux, ((cfg.get("official") or {}).get(aux) or {}).get("url"))


def _check_official(name: str, kind: str, aux: str, url: str | None) -> None:
    from pathlib import Path

    from .zsad.checkpoints import official_source

    key = f"backends.{name}.official.{aux}.url"
    if url and "://" not in url:
        if not Path(url).is_file():
            raise ConfigError(f"{key}: the official checkpoint file {url} does not exist")
        return
    if url:
        return
    try:
        known = official_source(kind, aux)
    except ValueError as err:
        raise ConfigError(f"backends.{name}.weights: official: {err}; set {key}") from None
    if not known.get("git_blob"):
        raise ConfigError(
            f"backends.{name}.weights: official: the official {kind} checkpoint trained on {aux!r} is published "
            f"only at {known['url']} (Google Drive, no checksum), so the pipeline does not download it: download "
            f"it by hand and set {key} to the file, or use weights: trained")


def check_inputs(config: dict) -> None:
    """Files and folders the config names: datasets' ``root`` and backbones' ``pretrained`` (a local file, a
    packaged tag or a tag with a pinned download, :mod:`anorefiner.backbones.weights`); CNN backbones set no
    open_clip option (``activation``, ``pos_embed``)."""
    from pathlib import Path

    from .backbones.weights import needs_fetch

    for name, ds in (config.get("datasets") or {}).items():
        root = (ds or {}).get("root")
        if root and not Path(root).is_dir():
            raise ConfigError(f"datasets.{name}.root: folder {root} does not exist (the extracted dataset; or null "
                              f"to download it)")
    from .backbones import CNN_NAMES

    for key, bb in (config.get("backbones") or {}).items():
        try:
            needs_fetch(bb["name"], bb.get("pretrained"))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"backbones.{key}.pretrained: {err}") from None
        for option in ("activation", "pos_embed"):
            if bb.get(option) is not None and bb["name"] in CNN_NAMES:
                raise ConfigError(f"backbones.{key}.{option}: {bb[option]!r} is an open_clip ViT option; "
                                  f"{bb['name']!r} is a CNN")


def check_workflow_config(config: dict) -> None:
    """Raise :class:`ConfigError` naming the first bad key or value of the library's option sections."""
    _refiner(refiner_options(config), "")
    for variant in config.get("variants") or {}:
        _refiner(refiner_options(config, variant), f"variants.{variant}")
    for name, cfg in (config.get("backends") or {}).items():
        check_backend(name, cfg, config)
        check_training(name, cfg)
    check_inputs(config)
    unknown = sorted(set((config.get("seas") or {}).get("datasets") or {}) - set(config.get("datasets") or {}))
    if unknown:
        raise ConfigError(f"seas.datasets: {unknown} are not configured datasets ({', '.join(config.get('datasets') or {})})")
    for dataset in config.get("datasets") or {}:
        seas_config(config, dataset)
    from .tta import check_config as check_tta

    check_tta(config)


def seas_options(config: dict, dataset: str) -> dict:
    """``seas.options`` with ``seas.datasets.<dataset>`` applied (the options of rule train_seas)."""
    section = config.get("seas") or {}
    return deep_update(copy.deepcopy(section.get("options") or {}),
                       copy.deepcopy((section.get("datasets") or {}).get(dataset) or {}))


def seas_config(config: dict, dataset: str):
    """The checked :class:`~anorefiner.seas.config.SeaSConfig` of ``dataset``."""
    from .seas.config import SeaSConfig

    where = f"seas (dataset {dataset})"
    try:
        cfg = from_dict(SeaSConfig, seas_options(config, dataset), where)
        cfg.validate()
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err
    return cfg
