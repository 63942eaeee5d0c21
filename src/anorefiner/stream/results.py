"""What the stream writes per image, and the append-only results log a restart continues from.

``OUT/results.jsonl``: one JSON object per line and per input image, in the order images were answered;
``status`` "ok" (scored) or "skipped" (with ``reason``). An image's files are in place (each written to a temp
sibling and renamed) before its line is appended and fsynced, so after a kill an image either has its line
(and its files) or is scored again on restart; a line cut off by the kill is removed on restart.

Per scored image (``<stem>`` = ``<index:06d>_<file stem>``, unique over the stream):

* ``OUT/maps/<stem>.npz``: ``coarse_patch`` [h, w] (the backend's patch-level map), ``coarse`` [E, E] (upsampled
  as the refined store's ``coarse`` method), ``final`` [E, E] (the answer: the refined map, or the coarse map
  before an ARD is in service), and ``ard`` [E, E] when refined; float32, zip-compressed (``numpy.load``).
* ``OUT/overlays/<stem>.png``: ``final`` over the image (jet colour map, half transparent).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..io import atomic_path
from ..log import LOG


class ResultsLog:
    """``OUT/results.jsonl`` (module doc): read on open (repairing a cut-off last line), then appended to."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: list[dict] = []
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            LOG.warning("stream: %s ends in a line cut off by a kill (%d bytes); that image is scored again",
                        self.path, len(data) - end)
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for number, line in enumerate(data[:end].decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                self.entries.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"results log {self.path} line {number} is not JSON ({err}): {line[:80]!r}") from None

    def append(self, entry: dict) -> None:
        line = json.dumps(entry, sort_keys=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)

    @property
    def scored(self) -> list[dict]:
        return [e for e in self.entries if e.get("status") == "ok"]

    def done_paths(self) -> set[str]:
        return {e["path"] for e in self.entries}


def output_stem(index: int, path: str | Path) -> str:
    return f"{int(index):06d}_{Path(path).stem}"


def write_maps(path: Path, maps: dict) -> Path:
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{k: np.asarray(v, dtype=np.float32) for k, v in maps.items()})
    return path


def read_maps(path: str | Path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def write_overlay(path: Path, image: np.ndarray, amap: np.ndarray, scale: tuple[float, float]) -> Path:
    """``amap`` (values ``scale[0]..scale[1]`` → jet colours) blended half-and-half over ``image`` at its size."""
    from matplotlib import colormaps
    from PIL import Image

    h, w = image.shape[:2]
    up = np.asarray(Image.fromarray(np.asarray(amap, np.float32), mode="F").resize((w, h), Image.BILINEAR))
    lo, hi = scale
    heat = colormaps["jet"](np.clip((up - lo) / max(hi - lo, 1e-12), 0.0, 1.0))[..., :3]
    blend = (0.5 * image.astype(np.float32) + 0.5 * 255.0 * heat).round().clip(0, 255).astype(np.uint8)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(blend).save(tmp, format="PNG")
    return path
