"""``anorefiner fetch-weights``: one backbone's pretrained weights into the local cache (rule ``weights``)."""

from __future__ import annotations

import argparse

NAME = "fetch-weights"
HELP = ("download and verify a backbone's pretrained weights (or SeaS's Stable Diffusion) into resources/weights "
        "(for offline compute jobs)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .download import add_retry_arguments

    p.add_argument("--model", required=True, help="backbone name, e.g. ViT-L-14-336, ViT-B-16-plus-240, resnet50; "
                                                  "or stable-diffusion-v1-4 (SeaS)")
    p.add_argument("--pretrained", required=True, help="tag, e.g. openai, laion400m_e31, imagenet")
    p.add_argument("--url", default="",
                   help="a mirror serving the same file, or the file itself if you have it (default: the pinned source)")
    p.add_argument("--sha256", default="", help="expected SHA-256 or its published prefix (default: the pinned one)")
    p.add_argument("--out", required=True, help="safetensors file, e.g. resources/weights/<model>/<tag>.safetensors "
                                               "(a diffusion model: its folder, resources/weights/<model>/<revision>)")
    p.add_argument("--endpoint", default=None, help="model hub address for diffusion models (default: $HF_ENDPOINT "
                                                    "or the public hub)")
    add_retry_arguments(p)


def main(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..backbones.weights import fetch_weights, source_for
    from ..config import ConfigError
    from ..seas.fetch import PINNED as DIFFUSION
    from .download import retry_options

    if args.model in DIFFUSION:  # a diffusers folder (SeaS's Stable Diffusion): --out is a folder
        return _diffusion(args, DIFFUSION[args.model], retry_options(args))
    source = source_for(args.model, args.pretrained)
    if source is None:
        if not (args.url and args.sha256):
            raise ConfigError(f"no pinned source for {args.model} {args.pretrained!r}: give --url and --sha256")
        from ..backbones.weights import WeightSource

        source = WeightSource(args.url, args.sha256)
    source = replace(source, url=args.url or source.url, sha256=args.sha256 or source.sha256)
    fetch_weights(source, args.out, retry_options(args))
    return 0


def _diffusion(args: argparse.Namespace, model, options) -> int:
    from ..config import ConfigError
    from ..seas.fetch import fetch_model

    if args.pretrained not in ("default", model.revision):
        raise ConfigError(f"{args.model} is pinned at revision {model.revision}; --pretrained {args.pretrained!r} "
                          "is not it (a local folder goes to the config key seas.weights instead)")
    if args.url or args.sha256:
        raise ConfigError(f"{args.model}: --url/--sha256 do not apply; its files are checked against the pinned tree")
    fetch_model(model, args.out, options, endpoint=args.endpoint)
    return 0
