"""``anorefiner train-backend``: a trained CLIP backend's weights, trained here or the official file.

The backend types with a trainer (:data:`anorefiner.zsad.registry.TRAINED_TYPES`, e.g. APRIL-GAN's
linear adapters, :mod:`anorefiner.zsad.april_gan.train`) are trained on the auxiliary dataset's test
split with masks; with ``--official`` the official checkpoint is downloaded and verified (git blob id or
SHA-256, :mod:`anorefiner.zsad.checkpoints`) instead. The few-shot types (PromptAD, MVFA-AD, RegAD; registry
``train_scope``) train per scored category instead (``--category``): on the ``--k-shot`` train/good images drawn
by ``--shots-seed``, or on the other ``--categories`` of the dataset. Either way the output is checked by the
trainer's ``check_checkpoint`` (keys and shapes) and written atomically.
"""

from __future__ import annotations

import json

from . import add_pos_embed_argument
from ..zsad.registry import BACKEND_TYPES, TRAINED_TYPES

NAME = "train-backend"
HELP = (f"train a backend ({', '.join(BACKEND_TYPES[t].paper.split(' (')[0] for t in TRAINED_TYPES)}) on the "
        "auxiliary dataset or a category's shots, or fetch its official checkpoint")


def add_arguments(p) -> None:
    p.add_argument("--backend-type", required=True, choices=list(TRAINED_TYPES), help="the trained backend type")
    p.add_argument("--root",
                   help="auxiliary dataset root (MVTec layout); its test split with masks is the training set")
    p.add_argument("--dataset", required=True,
                   help="auxiliary dataset name (visa trains the weights that score mvtec_ad)")
    p.add_argument("--backbone", required=True, help="open_clip name (ViT-L-14-336 in the paper)")
    p.add_argument("--resolution", type=int, required=True, help="backbone input resolution R")
    p.add_argument("--layers", nargs="*", default=None, help="1-indexed blocks (default: the quarters of the depth)")
    p.add_argument("--pretrained", default="default", help="open_clip tag, weights file, or 'none' (random, seed 0)")
    p.add_argument("--activation", choices=["gelu", "quick_gelu"], default=None,
                   help="open_clip ViTs: MLP activation (as the feature cache; default gelu)")
    add_pos_embed_argument(p)
    p.add_argument("--options", default="{}", help="training options as JSON (the trainer's TrainConfig fields)")
    p.add_argument("--category", default=None, help="few-shot types: the scored category (--dataset is its dataset)")
    p.add_argument("--k-shot", type=int, default=None, help="few-shot types: the shots per category (the row's k)")
    p.add_argument("--shots-seed", type=int, default=None,
                   help="few-shot types trained on the shots (PromptAD, MVFA-AD): the run seed drawing them")
    p.add_argument("--categories", nargs="*", default=None,
                   help="RegAD: the dataset's categories (it trains on all but --category)")
    p.add_argument("--text-cache", default=None, help="folder of the per-class text embedding cache (results/text)")
    p.add_argument("--official", default=None,
                   help="'default' (the official repository's file for --dataset), a URL or a local file: "
                        "fetch and verify instead of training")
    p.add_argument("--git-blob", default=None, help="expected git blob id of --official (default: the known one)")
    p.add_argument("--download-dir", default="resources/checkpoints", help="where official files are downloaded")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--out", required=True, help="checkpoint, e.g. results/checkpoints/<backend>/trained_<aux>.pt")


def main(args) -> int:
    from ..config import ConfigError, from_dict
    from ..zsad.registry import backend_type

    trainer = backend_type(args.backend_type).trainer_module()
    try:
        options = json.loads(args.options or "{}")
    except json.JSONDecodeError as err:
        raise ConfigError(f"--options is not valid JSON: {err}") from err
    if args.official:
        return _official(args, trainer)
    from ..backbones import build_backbone
    from ..seeding import seed_everything

    config = from_dict(trainer.TrainConfig, options, f"backends.{args.backend_type}.train.{args.dataset}")
    if not args.root:
        raise ConfigError("--root (the auxiliary dataset) is required unless --official is given")
    scope = backend_type(args.backend_type).train_scope
    if scope != "auxiliary" and (not args.category or args.k_shot is None):
        raise ConfigError(f"{args.backend_type} trains per category: --category and --k-shot are required")
    if scope == "shots" and args.shots_seed is None:
        raise ConfigError(f"{args.backend_type} trains on the shots drawn by a seed: --shots-seed is required")
    seed_everything(config.seed)
    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    backbone = build_backbone(args.backbone, args.resolution, layers=args.layers or None, pretrained=pretrained,
                              device=args.device, activation=args.activation, pos_embed=args.pos_embed)
    if scope == "auxiliary":
        trainer.train_backend(backbone, args.root, args.dataset, config, args.out, text_cache=args.text_cache)
    else:
        trainer.train_fewshot(backbone, args.root, args.dataset, args.category, config, args.out, k_shot=args.k_shot,
                              seed=args.shots_seed, categories=args.categories, text_cache=args.text_cache)
    trainer.check_checkpoint(args.out, backbone)  # the written file loads weights-only, keys and shapes checked
    return 0


def _official(args, trainer) -> int:
    import shutil
    from pathlib import Path

    from ..io import atomic_path
    from ..zsad.checkpoints import fetch_checkpoint, official_source

    known = official_source(args.backend_type, args.dataset) if args.official == "default" or not args.git_blob else {}
    url = known.get("url") if args.official == "default" else args.official
    blob = args.git_blob or known.get("git_blob")
    if blob:
        name = Path(url.split("?")[0]).name
        local = fetch_checkpoint(url, Path(args.download_dir) / args.backend_type / args.dataset / name, blob)
    else:  # Google-Drive-only official files (VCP-CLIP, AdaCLIP) publish no checksum
        local = _unverifiable_local(args, url)
    trainer.check_checkpoint(local)  # keys and shapes checked before anything is written to --out
    with atomic_path(args.out) as tmp:
        shutil.copyfile(local, tmp)
    return 0


def _unverifiable_local(args, url: str):
    """An official file with no published checksum: only a local file the user downloaded is accepted (its
    SHA-256 is logged; the caller checks its keys and shapes). Nothing is downloaded without a checksum."""
    from pathlib import Path

    from ..config import ConfigError
    from ..io import sha256_file
    from ..log import LOG

    if "://" in str(url):
        raise ConfigError(
            f"the official {args.backend_type} checkpoint for {args.dataset!r} ({url}) has no published checksum, so "
            f"it is not downloaded: download it by hand and set backends.<name>.official.{args.dataset}.url to the "
            f"local file (its keys and shapes are checked), or use weights: trained")
    local = Path(url)
    if not local.is_file():
        raise FileNotFoundError(f"official {args.backend_type} checkpoint {local} does not exist")
    LOG.warning("official %s checkpoint %s: no published checksum, sha256 %s (only its keys and shapes are checked)",
                args.backend_type, local, sha256_file(local))
    return local
