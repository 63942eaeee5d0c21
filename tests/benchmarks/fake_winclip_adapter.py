"""benchmarks/parity/winclip.py pointed at the fake anomalib (tests/benchmarks/fake_anomalib) and the project's
tiny CLIP: its own official() and ours(), only the pins, the open_clip range and the model replaced."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks" / "parity"))

import core  # noqa: E402
import winclip as real  # noqa: E402

FAKE = HERE / "fake_anomalib"
FILES = ("anomalib/__init__.py", "anomalib/data/utils/image.py", "anomalib/models/image/winclip/lightning_model.py",
         "anomalib/models/image/winclip/torch_model.py")
REPO, COMMIT = "anorefiner/fake-anomalib", "0000000"
PINNED = {rel: core.git_blob_id(FAKE / rel) for rel in FILES}
DEFAULTS = dict(real.DEFAULTS, model="anorefiner-tiny-clip", image_size=42)
STAGES, CHOICES = real.STAGES, real.CHOICES
real.OPEN_CLIP_PIN = ((0,), (99,))  # the fake runs on the project's open_clip
official, ours = real.official, real.ours
