"""Parity check: a backend against its official code on identical seeded random weights (by hand, like the
benchmarks; CI tests the harness on a fake official module, tests/benchmarks/test_parity.py).

Point ``--official`` at a clone of the official repository at the pinned commit (verified by the git blob
ids of the files it runs); the official inference path runs unchanged in a subprocess, ours through the
project's official-checkpoint path, and every stage's max abs/rel difference is printed with pass/fail at
1e-4 (project choices that differ from the official code on purpose are reported separately). Exit status 0
when every stage passes.

    git clone https://github.com/caoyunkang/AdaCLIP /tmp/AdaCLIP && git -C /tmp/AdaCLIP checkout e27ee32
    python benchmarks/parity/run.py adaclip --official /tmp/AdaCLIP
    python benchmarks/parity/run.py adaclip --official /tmp/AdaCLIP --model ViT-L-14-336 --image-size 518

Backends: see ``ADAPTERS`` (docs/fidelity.md lists the pinned commits and the measured figures).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from core import HERE, TOLERANCE, PinError, format_rows, load_adapter, run

ADAPTERS = {name: HERE / f"{name}.py" for name in (
    "adaclip", "april_gan", "anomalyclip", "musc", "rareclip", "vcp_clip", "bayes_pfl", "aa_clip", "winclip")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backend", help=f"one of {sorted(ADAPTERS)}, or the path of an adapter module")
    p.add_argument("--official", required=True, type=Path, help="clone of the official repository")
    p.add_argument("--model", help="CLIP architecture (default: the adapter's, small enough for a CPU)")
    p.add_argument("--image-size", type=int, help="input size (default: the adapter's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and images")
    p.add_argument("--clip", type=Path, help="OpenAI's CLIP file (TorchScript .pt) instead of the seeded random one")
    p.add_argument("--checkpoint", type=Path, help="the method's official checkpoint instead of random weights")
    p.add_argument("--images", type=Path, nargs="+", help="test images instead of the generated ones")
    p.add_argument("--python", default=sys.executable, help="interpreter of the official side (its own venv)")
    p.add_argument("--work", type=Path, help="keep the weights, images and outputs here (default: a temp dir)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE)
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = p.parse_args(argv)
    path = ADAPTERS.get(args.backend, Path(args.backend))
    if not Path(path).is_file():
        p.error(f"unknown backend {args.backend!r}: one of {sorted(ADAPTERS)} or an adapter file")
    adapter = load_adapter(path)
    spec = dict(getattr(adapter, "DEFAULTS", {}), seed=args.seed)
    if args.model:
        spec["model"] = args.model
    if args.image_size:
        spec["image_size"] = args.image_size
    for key in ("clip", "checkpoint"):
        if getattr(args, key):
            spec[key] = str(getattr(args, key).resolve())
    if args.images:
        spec["images"] = [str(p.resolve()) for p in args.images]
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        work = args.work or Path(tmp)
        try:
            rows, ok = run(path, args.official, work, spec, args.python, args.tolerance)
        except PinError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    shown = {k: spec[k] for k in ("model", "image_size", "seed", "class_name") if k in spec}
    name = f"{args.backend} vs {adapter.REPO}@{adapter.COMMIT} ({json.dumps(shown)})"
    print(format_rows(name, rows, args.tolerance))
    print(f"shims on the official side: {', '.join(spec.get('shims', [])) or 'none'}")
    print("PASS" if ok else "FAIL")
    if args.json:
        args.json.write_text(json.dumps({"backend": args.backend, "repo": adapter.REPO, "commit": adapter.COMMIT,
                                         "spec": spec, "rows": rows, "pass": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
