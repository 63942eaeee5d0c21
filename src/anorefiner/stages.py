"""The pipeline's stages as library functions (docs/architecture.md "Data flow").

features → coarse → refine (PGT) → evaluate. Each workflow rule's subcommand (``anorefiner features``,
``coarse``, ``pgt``, ``metrics``) and ``anorefiner run`` call these same functions, so the two paths
cannot drift apart.

Provenance: every stage records the settings that determine its output — the feature cache its
backbone identity (name, weights, resolution, layers, preprocessing, activation when the backbone
reports one), the coarse and refined stores a ``provenance`` attribute (backend and its options, seed,
refiner options, evaluation resolution, textures, and the provenance of their inputs). With
``reuse=True`` (``anorefiner run`` without ``--force``) an existing output is kept only when its
recorded settings equal this call's; otherwise it is recomputed and the log names the first setting
that differs. The workflow never reuses: Snakemake decides what to rerun.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .io import remove_stale_temps
from .log import LOG
from .provenance import run_record, store_records, weight_source

# Recorded but not compared: package versions, and options that change where or how fast a result
# is computed, not what it is.
NOT_COMPARED = ("versions", "n_done", "compression", "device", "chunk", "feature_batch_size")


# ------------------------------------------------------------------------------------ provenance
def _strip(value):
    if isinstance(value, dict):
        return {str(k): _strip(v) for k, v in sorted(value.items()) if k not in NOT_COMPARED}
    if isinstance(value, (list, tuple)):
        return [_strip(v) for v in value]
    return value


def canonical(value):
    """``value`` as plain JSON types without the keys in :data:`NOT_COMPARED` (tuples become lists)."""
    return _strip(json.loads(json.dumps(value, sort_keys=True, default=str)))


def first_difference(stored, expected, where: str = "") -> str | None:
    """``"key: stored X, now Y"`` for the first dotted key whose value differs; None when equal."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        for key in sorted(set(stored) | set(expected)):
            path = f"{where}.{key}" if where else str(key)
            if key not in stored:
                return f"{path}: not recorded, now {expected[key]!r}"
            if key not in expected:
                return f"{path}: recorded {stored[key]!r}, not set now"
            diff = first_difference(stored[key], expected[key], path)
            if diff is not None:
                return diff
        return None
    if stored != expected:
        return f"{where or 'value'}: {stored!r} there, {expected!r} now"
    return None


def feature_provenance(attrs: dict) -> dict:
    """The settings of a feature cache that determine its contents (its attrs minus bookkeeping)."""
    return canonical({k: v for k, v in attrs.items() if k not in ("n_images", "format", "dtype_note")})


def stored_attrs(path: str | Path) -> dict:
    """The file attributes of an HDF5 store, JSON strings decoded (as the feature cache decodes its own)."""
    import h5py

    from .cache import _decode_attrs

    with h5py.File(path, "r") as f:
        return _decode_attrs(f.attrs)


def stored_provenance(path: str | Path) -> dict | None:
    """The ``provenance`` attribute of a coarse or refined store (None when it has none)."""
    value = stored_attrs(path).get("provenance")
    return value if isinstance(value, dict) else None


def stored_ids(path: str | Path) -> list[str]:
    import h5py

    with h5py.File(path, "r") as f:
        return f["ids"].asstr()[()].tolist() if "ids" in f else []


def reusable(path: str | Path, expected: dict, reuse: bool, ids: list[str] | None = None,
             stored: dict | None = None) -> bool:
    """True when ``reuse`` is set and ``path`` was made with exactly the ``expected`` settings (and ``ids``).

    A mismatch is logged with the setting that differs; the caller then recomputes ``path``.
    """
    path = Path(path)
    if not reuse or not path.is_file():
        return False
    try:
        recorded = stored if stored is not None else stored_provenance(path)
        why = ("it records no provenance (made by an older version)" if recorded is None
               else first_difference(canonical(recorded), canonical(expected)))
        if why is None and ids is not None and stored_ids(path) != list(ids):
            why = "its image ids differ from the dataset's test images"
    except (OSError, KeyError, ValueError) as err:
        why = f"it is unreadable ({err})"
    if why is None:
        LOG.info("reusing %s (made with the same settings)", path)
        return True
    LOG.warning("%s was made with other settings (%s): recomputing it", path, why)
    return False


def checkpoint_of(options: dict) -> str | None:
    """The trained weights a backend reads (``checkpoint`` option; PA-CLIP-on-top's base backend's)."""
    return options.get("checkpoint") or (options.get("base_options") or {}).get("checkpoint")


# ------------------------------------------------------------------------------------ inputs
def backend_options(backend_type: str, options: dict | str | None, *, dataset: str, category: str,
                    device: str = "auto", byo_maps: str | None = None) -> dict:
    """A backend's options (config ``backends.<name>.options``) with what the pipeline fills in:
    the device, MuSc's dataset (RsCIN k list), PA-CLIP's category (prompts), BYO's maps file."""
    from .config import ConfigError, json_object
    from .zsad.registry import BACKEND_TYPES

    if isinstance(options, str) or options is None:
        options = json_object(options, "backend options")
    if not isinstance(options, dict):
        raise ConfigError(f"backend options must be a JSON object, got {options!r}")
    options = json.loads(json.dumps(options))  # a deep copy
    kind = BACKEND_TYPES.get(backend_type)
    if backend_type == "musc" or (kind and (kind.clip or kind.shots)):
        options.setdefault("device", device)
    if kind and kind.class_name:
        options.setdefault("class_name", category)  # verbatim: the official prompts use meta.json's keys
    if backend_type == "musc":
        options.setdefault("dataset", dataset)
    elif backend_type == "paclip":
        options.setdefault("category", category.replace("_", " "))
    elif backend_type == "byo":
        if byo_maps:
            options["maps_path"] = str(byo_maps)
        proxy = options.setdefault("musc", {})
        proxy.setdefault("dataset", dataset)
        proxy.setdefault("device", device)
    return options


def make_backend(backend_name: str, backend_type: str, options: dict, *, backbone=None, seed: int = 0):
    """The backend of config ``backends.<backend_name>`` (a preset name keeps its preset)."""
    from .zsad import PRESETS, get_backend

    key = backend_name if PRESETS.get(backend_name, (None,))[0] == backend_type else backend_type
    return get_backend(key, options, backbone=backbone, seed=seed)


def cache_backbone(feature_attrs: dict, name: str, resolution: int | None = None, pretrained="default",
                   device="auto", activation: str | None = None, pos_embed: str | None = None):
    """The backbone that made a feature cache (its layers, activation and position-embedding resize, read from
    the cache unless given); other weights, resolution, activation or resize is an error."""
    from .backbones import build_backbone
    from .backbones.clip_vit import pos_embed_mode

    resolution = resolution or feature_attrs.get("resolution")
    if not resolution:
        raise ValueError(f"backbone {name!r}: no resolution given and the feature cache records none")
    cached = {"activation": feature_attrs.get("activation"),
              "pos_embed": pos_embed_mode(feature_attrs.get("pos_embed"))}
    asked = {"activation": activation, "pos_embed": pos_embed}
    for key, value in asked.items():
        if value is not None and cached[key] is not None and str(value) != str(cached[key]):
            raise ValueError(f"feature cache attribute {key!r} is {cached[key]!r} but {value!r} was asked for: "
                             "re-extract the features or fix the configuration")
    pretrained = None if str(pretrained).lower() == "none" else pretrained
    backbone = build_backbone(name, int(resolution), layers=feature_attrs.get("layers"), pretrained=pretrained,
                              device=device, activation=activation or cached["activation"],
                              pos_embed=pos_embed or cached["pos_embed"])
    check_backbone(feature_attrs, backbone)
    return backbone


def check_backbone(feature_attrs: dict, backbone) -> None:
    """Pseudo-anomaly features (PGT) and CADA views (PA-CLIP) must come from the cache's backbone."""
    for key in ("backbone", "resolution", "weights", "activation", "pos_embed"):
        cached = feature_attrs.get(key)
        if cached is not None and str(cached) != str(backbone.identity.get(key)):
            raise ValueError(f"feature cache attribute {key!r} is {cached!r} but the backbone given has "
                             f"{backbone.identity.get(key)!r}: it must be the backbone that made the cache")


def image_source(root, dataset: str, category: str, ids: list[str]):
    """``indices -> list of uint8 images`` of the test images ``ids`` under ``root`` (PA-CLIP's CADA)."""
    from .data.index import load_image, test_rows

    paths = list(test_rows(root, category, ids, dataset=dataset)["image_path"])
    return lambda indices: [load_image(paths[int(i)]) for i in indices]


def load_textures(spec: str, seed: int, category: str | None = None):
    """``offline`` → scikit-image stand-ins (without the one named like ``category``: the demo's brick and grass
    categories are made of those photos); anything else is a DTD root folder."""
    from .data.textures import texture_source

    if spec == "offline":
        return texture_source("offline", seed=seed, exclude=(category,) if category else ())
    return texture_source("dtd", dtd_root=spec)


# ------------------------------------------------------------------------------------ stages
def features(index, backbone, out, *, batch_size: int = 8, dtype: str = "float16", compression=None,
             workers: int = 1, reuse: bool = False) -> Path:
    """Stage 1 (rule ``features``): backbone features of the index's test images → feature cache."""
    from .cache import cache_attrs, extract_features, read_attrs

    out = Path(out)
    compression = None if compression in (None, "none") else compression
    expected_attrs = {"dataset": str(index["dataset"].iloc[0]), "category": str(index["category"].iloc[0])}
    test_ids = [str(i) for i in index.loc[index["split"] == "test", "image_id"]]
    if reuse and out.is_file():
        expected = feature_provenance(cache_attrs(backbone, dtype, compression, expected_attrs))
        try:
            stored = feature_provenance(read_attrs(out))
        except OSError:
            stored = None
        if reusable(out, expected, reuse, ids=test_ids, stored=stored):
            return out
    remove_stale_temps(out)
    return extract_features(index, backbone, out, batch_size=batch_size, dtype=dtype, compression=compression,
                            expected_attrs=expected_attrs, workers=workers)


def coarse(features_path, backend_name: str, backend_type: str, options: dict, *, seed: int, dataset: str,
           category: str, out, backbone=None, data_root=None, reuse: bool = False) -> Path:
    """Stage 2 (rule ``coarse``): zero-shot coarse maps of the cached images → coarse store.

    ``options``: from :func:`backend_options`. ``backbone`` (optional): PA-CLIP's text tower and image
    re-extraction, RsCIN's CLIP image embedding; with ``data_root`` PA-CLIP's CADA augments real images.
    """
    from .cache import read_attrs, read_features
    from .seeding import seed_everything
    from .zsad.registry import BACKEND_TYPES
    from .zsad.store import write_coarse

    out = Path(out)
    feature_attrs = read_attrs(features_path)
    provenance = {"stage": "coarse", "backend": backend_name, "backend_type": backend_type, "options": options,
                  "seed": int(seed), "dataset": dataset, "category": category,
                  "features": feature_provenance(feature_attrs)}
    if reusable(out, provenance, reuse):
        return out
    remove_stale_temps(out)
    if backbone is not None:
        check_backbone(feature_attrs, backbone)
    seed_everything(seed)
    feats = read_features(features_path)
    backend = make_backend(backend_name, backend_type, options, backbone=backbone, seed=seed)
    kind = BACKEND_TYPES.get(backend_type)
    if data_root and kind is not None and kind.images:
        backend.images = image_source(data_root, dataset, category, feats.ids)  # it runs its own forward pass
    if backend_type == "winclip" and data_root:  # WinCLIP's k-shot draws train/good images
        from .zsad.winclip.backend import train_good_source

        backend.reference_images = train_good_source(data_root, dataset, category)
    if data_root and kind is not None and kind.shots:  # the few-shot methods' train/good shots
        from .zsad.shots import TrainGood

        backend.train_images = TrainGood(data_root, dataset, category)
    if backend_type == "paclip" and data_root and backbone is not None:
        backend.images = image_source(data_root, dataset, category, feats.ids)
    elif backend_type == "paclip" and backbone is None:
        LOG.warning("PA-CLIP without a backbone: no text tower, no image-level augmentation")
    LOG.info("coarse %s/%s (%s): scoring %d images", dataset, category, backend_name, len(feats.ids))
    start = time.perf_counter()
    result = backend.coarse(feats)
    seconds = time.perf_counter() - start
    attrs = {"backend": backend_name, "backend_type": backend_type, "options": options, "seed": int(seed),
             "dataset": dataset, "category": category, "features": str(features_path),
             "features_identity": {k: (v if isinstance(v, (int, float, str)) else str(v))
                                   for k, v in feats.attrs.items()},
             "seconds": seconds, "provenance": canonical(provenance),
             "run": run_record(options.get("device", getattr(backbone, "device", None)), canonical(provenance)),
             "weights": weight_source(feature_attrs.get("weights"), checkpoint_of(options),
                                      feature_attrs.get("backbone"))}
    if backend_type == "paclip":
        attrs["paclip_info"] = json.dumps(backend.last_info)
    elif getattr(backend, "last_info", None) is not None:
        attrs["backend_info"] = json.dumps(backend.last_info)  # map_level: the store's token-grid choice
    write_coarse(out, feats.ids, result.maps, result.scores, attrs)
    LOG.info("coarse %s/%s (%s): %d maps %s in %.1f s -> %s", dataset, category, backend_name,
             len(feats.ids), tuple(result.maps.shape[1:]), seconds, out)
    return out


def check_coarse_seed(coarse_path, coarse_provenance: dict | None, seed: int, backend_name: str, backend_type: str,
                      backend_opts: dict) -> None:
    """PGT's backend scores the pseudo-anomalies within the groups drawn with the run seed; a seed-dependent backend
    (MuSc*'s groups) made the coarse maps with their seed. The two must agree (the workflow's ``coarse_seed``)."""
    from .zsad import seed_dependent_backend

    made_with = (coarse_provenance or {}).get("seed")
    if made_with is None or int(made_with) == int(seed):
        return
    if seed_dependent_backend(backend_name, backend_type, backend_opts):
        raise ValueError(f"coarse store {coarse_path} was made with seed {made_with}, PGT runs seed {seed}: backend "
                         f"{backend_name!r} ({backend_type}) depends on the seed, so the pseudo-anomalies would be "
                         f"scored in other groups than the real images; compute the coarse maps with seed {seed}")


def refine(root, dataset: str, category: str, features_path, coarse_path, *, backbone, backend_name: str,
           backend_type: str, backend_opts: dict, options, seed: int, textures: str = "offline",
           eval_resolution: int = 518, device="cpu", out, reuse: bool = False, seas_model=None) -> Path:
    """Stage 3 (rule ``pgt``): AnoRefiner (ARD trained by PGT) on the coarse maps → refined store.

    ``backbone`` must be the one that made the feature cache (pseudo-anomaly features). ``seas_model``: the trained
    SeaS model (rule ``train_seas``) of ``synthesis.method: seas``; the test images it learnt from are recorded as
    ``excluded_from_scoring`` in the store, and :func:`evaluate` leaves them out.
    """
    from .cache import read_attrs, read_features
    from .data.index import test_rows
    from .refine.pgt import run_pgt
    from .refine.store import write_refined
    from .seeding import seed_everything
    from .zsad.store import read_coarse

    out = Path(out)
    options.validate()
    seas = options.synthesis.method == "seas"
    if seas and not seas_model:
        raise ValueError("synthesis.method 'seas' needs the trained SeaS model (--seas-model; rule train_seas)")
    provenance = {"stage": "refined", "coarse": stored_provenance(coarse_path), "options": asdict(options),
                  "seed": int(seed), "eval_resolution": int(eval_resolution), "textures": str(textures),
                  "backend": backend_name, "backend_options": backend_opts}
    if seas:
        from .seas.data import model_record

        provenance["seas"] = model_record(seas_model)
    if reusable(out, provenance, reuse):
        return out
    remove_stale_temps(out)
    feature_attrs = read_attrs(features_path)
    coarse_records = store_records(stored_attrs(coarse_path))["coarse"]
    made_from = (provenance["coarse"] or {}).get("features")
    why = made_from and first_difference(canonical(made_from), feature_provenance(feature_attrs))
    if why:
        raise ValueError(f"coarse store {coarse_path} was computed from other features than {features_path} "
                         f"({why}); recompute the coarse maps from this cache")
    check_backbone(feature_attrs, backbone)
    check_coarse_seed(coarse_path, provenance["coarse"], seed, backend_name, backend_type, backend_opts)
    seed_everything(seed)
    feats = read_features(features_path)
    coarse_store = read_coarse(coarse_path, expect_ids=feats.ids)
    df = test_rows(root, category, feats.ids, dataset=dataset)
    # Table 4 only; run_pgt logs loudly that ground-truth labels are used.
    labels = df["label"].to_numpy(dtype=np.int64) if options.pgt.contamination_ratio > 0 else None
    backend = make_backend(backend_name, backend_type, backend_opts, backbone=backbone, seed=seed)
    source = load_textures(textures, seed, category)
    if seas:
        from .seas.generate import SeaSGenerator

        source = SeaSGenerator(seas_model, device)
    refined = run_pgt(feats, coarse_store, list(df["image_path"]), backbone, backend, options, seed=seed,
                      textures=source, eval_resolution=eval_resolution, labels=labels, device=device)
    if seas:
        refined.attrs["excluded_from_scoring"] = [i for i in provenance["seas"]["trained_on"] if i in set(feats.ids)]
    n_refined = int(refined.attrs["n_refined_by_ard"])
    if n_refined == 0:
        LOG.warning("NOT REFINED: %s/%s: no image was refined by a trained ARD (%d test images in %d group(s), "
                    "%d epochs); 'ard' and 'combined' only rescale the coarse maps", dataset, category,
                    len(refined.ids), refined.attrs["n_groups"], options.pgt.epochs)
    refined.attrs.update({"dataset": dataset, "category": category, "features": str(features_path),
                          "coarse": str(coarse_path), "backend": backend_name, "backend_options": backend_opts,
                          "textures": textures, "device": str(device),
                          "provenance": canonical(provenance),
                          "run": run_record(device, canonical(provenance)), "inputs": {"coarse": coarse_records},
                          "weights": coarse_records["weights"]})
    write_refined(out, refined)
    LOG.info("pgt %s/%s: %d images in %d groups (%d refined by the ARD), %.1f s -> %s", dataset, category,
             len(refined.ids), refined.attrs["n_groups"], n_refined, refined.attrs["timings"]["total_s"], out)
    return out


def evaluate(root, dataset: str, category: str, source, options) -> list[dict]:
    """Stage 4 (rule ``metrics``): ``{method, metric, value}`` rows of a coarse or refined store."""
    from .metrics import evaluate_category

    ids, methods, attrs = load_methods(source)
    ids, methods = drop_excluded(ids, methods, attrs.get("excluded_from_scoring") or [], source)
    if attrs.get("n_refined_by_ard") == 0:
        LOG.warning("NOT REFINED: %s holds no image refined by a trained ARD: its 'ard' and 'combined' rows "
                    "describe rescaled coarse maps", source)
    masks, labels = ground_truth(root, dataset, category, ids, resolution=options.resolution,
                                 rule=options.mask_resize)
    LOG.info("scoring %s/%s: %d images, methods %s, PRO %s", dataset, category, len(ids), sorted(methods),
             options.pro_variant if options.compute_pro else "off")
    return evaluate_category(methods, masks, labels, options)


def drop_excluded(ids: list[str], methods: dict, excluded, source) -> tuple[list[str], dict]:
    """Leave out the images a store marks ``excluded_from_scoring`` (the test images SeaS learnt from)."""
    excluded = set(excluded)
    if not excluded:
        return ids, methods
    keep = np.asarray([i not in excluded for i in ids])
    LOG.info("%s: %d test image(s) left out of scoring (SeaS learnt from them): %s", source, int((~keep).sum()),
             sorted(excluded & set(ids)))
    return ([i for i, k in zip(ids, keep) if k],
            {m: (np.asarray(maps)[keep], np.asarray(scores)[keep]) for m, (maps, scores) in methods.items()})


def load_methods(source) -> tuple[list[str], dict, dict]:
    """``(ids, {method: (maps, scores)}, attrs)`` of a coarse store (method ``coarse``) or a refined store."""
    import h5py

    with h5py.File(source, "r") as f:
        is_refined = "maps" in f and isinstance(f["maps"], h5py.Group)
    if is_refined:
        from .refine.store import METHODS, read_refined

        refined = read_refined(source)
        order = sorted(refined.maps, key=lambda m: (METHODS.index(m) if m in METHODS else len(METHODS), m))
        return list(refined.ids), {m: (refined.maps[m], refined.scores[m]) for m in order}, refined.attrs
    from .zsad.store import read_coarse

    c = read_coarse(source)
    return list(c.ids), {"coarse": (c.maps, c.scores)}, c.attrs


def ground_truth(root, dataset: str, category: str, ids: list[str], resolution: int | None = None,
                 rule: str = "nearest"):
    """Masks ``[N,H,W]`` bool and labels ``[N]`` of the test images, in ``ids`` order.

    Masks keep their size when all images share one; images of different sizes need an evaluation
    ``resolution``, to which each mask is resized (``rule`` as in ``EvalConfig.mask_resize``).
    """
    from .data.index import image_size, load_mask, test_rows
    from .metrics.evaluate import resize_masks

    df = test_rows(root, category, ids, dataset=dataset)
    masks, sizes = [], {}
    for image_id, row in df.iterrows():
        size = image_size(row["image_path"])
        sizes.setdefault(size, row["image_path"])
        # Good images have no mask file: an all-False mask of the image's size.
        masks.append(load_mask(row["mask_path"], expected_size=size) if row["mask_path"]
                     else np.zeros(size, dtype=bool))
    if len(sizes) > 1:
        if resolution is None:
            (a, pa), (b, pb) = list(sizes.items())[:2]
            raise ValueError(f"{root}/{category}: test images differ in size ({pa} is {a[0]}x{a[1]}, {pb} is "
                             f"{b[0]}x{b[1]}); evaluating them needs one resolution (evaluation.resolution)")
        masks = [resize_masks(m[None], (resolution, resolution), rule)[0] for m in masks]
    return np.stack(masks), df["label"].to_numpy(dtype=np.int64)
