"""HDF5 feature cache (one file per dataset, category, backbone and resolution).

Layout of ``<category>.h5``::

    ids                 [N] utf-8     image ids of the test split, in index order
    layers/<name>       [N,h,w,C]     patch tokens (float16 by default), one chunk per image (1,h,w,C)
    cls                 [N,D] float32 class token (ViTs only; kept in float32: PA-CLIP compares it
                                      with text embeddings)
    attrs               JSON-encoded values: backbone identity (name, weights, resolution, layers,
                        preprocessing, package versions; ``activation`` gelu/quick_gelu for CLIP
                        ViTs, which readers pass in ``expect`` so the two can never be mixed up),
                        dtype, compression, n_images, plus the
                        caller's ``expected_attrs`` (dataset, category); integer ``n_done``.

Extraction writes ``<path>.partial`` and renames it onto ``<path>`` only when every image is done,
so a reader never sees a half-written cache. ``n_done`` is flushed after every batch: a killed
extraction resumes from the last complete batch when rerun with the same settings.
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .log import LOG, progress

FORMAT = "anorefiner-features/1"
DTYPES = ("float16", "float32")
COMPRESSIONS = (None, "lzf", "gzip")
_NOT_COMPARED = ("n_done",)


@dataclass
class Features:
    """Cached backbone features of one category's test images, in index order."""

    ids: list[str]
    layers: dict[str, np.ndarray]  # layer name -> [N, h, w, C]
    cls: np.ndarray | None = None  # [N, D] class/global token, None for CNNs
    attrs: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- attrs
def cache_attrs(backbone, dtype: str = "float16", compression: str | None = None,
                expected_attrs: dict | None = None, n_images: int | None = None) -> dict:
    """The attributes a cache made by ``backbone`` with these settings carries.

    ``expected_attrs`` (e.g. ``{"dataset": ..., "category": ...}`` or config values such as
    ``resolution``) are recorded too; one that contradicts the backbone's identity is an error.
    """
    attrs = dict(backbone.identity)
    attrs.update(format=FORMAT, dtype=dtype, compression=compression)
    if n_images is not None:
        attrs["n_images"] = int(n_images)
    for key, value in (expected_attrs or {}).items():
        if key in attrs and not _same(key, attrs[key], value):
            raise ValueError(f"expected_attrs[{key!r}] = {value!r} but the backbone/settings give {attrs[key]!r}")
        attrs[key] = attrs.get(key, value)
    return attrs


def check_attrs(attrs: dict, expect: dict | None, where: str) -> None:
    """Raise ``ValueError`` naming the first key of ``expect`` that ``attrs`` lacks or contradicts."""
    for key, value in (expect or {}).items():
        if key not in attrs:
            raise ValueError(f"{where}: attribute {key!r} is missing (expected {value!r}); re-extract the features")
        if not _same(key, attrs[key], value):
            raise ValueError(
                f"{where}: attribute {key!r} is {attrs[key]!r} but the configuration expects {value!r}; "
                f"re-extract the features or fix the configuration"
            )


def read_attrs(path: str | os.PathLike) -> dict:
    import h5py

    with h5py.File(_existing(path), "r") as f:
        return _decode_attrs(f.attrs)


def _same(key: str, a, b) -> bool:
    if key == "layers":  # config may say [6, 12], the cache stores ["6", "12"]
        return [str(v) for v in a] == [str(v) for v in b]
    return _canon(a) == _canon(b)


def _canon(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _encode_attrs(target, attrs: dict) -> None:
    for key, value in attrs.items():
        target[key] = json.dumps(value, sort_keys=True, default=str)


def _decode_attrs(source) -> dict:
    out = {}
    for key, value in source.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------- write
def extract_features(
    index_df,
    backbone,
    out_path: str | os.PathLike,
    batch_size: int = 8,
    dtype: str = "float16",
    compression: str | None = None,
    expected_attrs: dict | None = None,
    workers: int = 1,
) -> Path:
    """Extract ``backbone`` features of the test-split rows of ``index_df`` (in index order) into
    ``out_path`` (docs/architecture.md "Feature cache").

    ``workers`` threads decode and preprocess the next batches while the model runs (0: inline).
    A rerun after a kill resumes from ``<out_path>.partial`` when its attributes and ids match.
    """
    compression = None if compression in (None, "none") else compression
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r} is not one of none, lzf, gzip")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for col in ("split", "image_id", "image_path"):
        if col not in index_df.columns:
            raise ValueError(f"index has no column {col!r} (columns: {list(index_df.columns)})")
    test = index_df[index_df["split"] == "test"]
    if test.empty:
        raise ValueError(f"index has no test-split rows to extract into {out_path}")
    ids = [str(v) for v in test["image_id"]]
    paths = [str(v) for v in test["image_path"]]
    if len(set(ids)) != len(ids):
        raise ValueError("index has duplicate image_id values in the test split")
    n = len(ids)
    attrs = cache_attrs(backbone, dtype, compression, expected_attrs, n_images=n)
    if str(attrs.get("weights", "")).startswith("random"):
        LOG.warning("%s: backbone %s has RANDOM weights (%s): these features and every map, metric and table made "
                    "from them are NOT MEANINGFUL (a smoke test of the code path only)", out_path, attrs.get("backbone"),
                    attrs["weights"])

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    f, start = _open_partial(partial, attrs, ids)
    bar = progress(total=n, initial=start, desc=f"features {out_path.name}", unit="img")
    batches = _prefetched_batches(paths, start, batch_size, backbone, workers)
    try:
        for (a, b), batch in batches:
            layers, cls = backbone.forward(batch)
            if f is None:
                f = _create(partial, attrs, ids, layers, cls, dtype, compression)
            _write_rows(f, partial, a, b, layers, cls, dtype)
            f.flush()  # rows first, then the counter that declares them done
            f.attrs["n_done"] = b
            f.flush()
            bar.update(b - a)
    finally:
        batches.close()  # stop the loader threads now, not when the traceback is freed
        bar.close()
        if f is not None:
            f.close()
    os.replace(partial, out_path)
    LOG.info("wrote %s (%d images, layers %s)", out_path, n, ", ".join(attrs["layers"]))
    return out_path


def _open_partial(partial: Path, attrs: dict, ids: list[str]):
    """An open partial file to continue and its ``n_done``, or ``(None, 0)`` to start over."""
    import h5py

    if not partial.exists():
        return None, 0
    try:
        f = h5py.File(partial, "r+")
    except OSError as err:
        LOG.warning("%s is unreadable (%s): starting over", partial, err)
        partial.unlink()
        return None, 0
    try:
        reason = _partial_mismatch(f, attrs, ids)
    except Exception as err:  # a file killed mid-write can hold damaged objects
        reason = f"unreadable content: {err}"
    if reason is not None:
        LOG.warning("%s does not match this extraction (%s): starting over", partial, reason)
        f.close()
        partial.unlink()
        return None, 0
    n_done = int(f.attrs.get("n_done", 0))
    LOG.info("resuming %s at image %d of %d", partial, n_done, len(ids))
    return f, n_done


def _partial_mismatch(f, attrs: dict, ids: list[str]) -> str | None:
    stored = _decode_attrs(f.attrs)
    for key in sorted(set(stored) | set(attrs)):
        if key not in _NOT_COMPARED and not _same(key, stored.get(key), attrs.get(key)):
            return f"attribute {key!r} was {stored.get(key)!r}, now {attrs.get(key)!r}"
    if "ids" not in f or f["ids"].asstr()[()].tolist() != ids:
        return "image ids differ"
    if any(f"layers/{name}" not in f for name in attrs["layers"]):
        return "layers missing"
    if not 0 <= int(f.attrs.get("n_done", -1)) <= len(ids):
        return f"n_done {f.attrs.get('n_done')!r} out of range"
    return None


def _create(partial: Path, attrs, ids, layers, cls, dtype, compression):
    import h5py

    n = len(ids)
    if list(layers) != list(attrs["layers"]):
        raise ValueError(f"backbone returned layers {list(layers)}, its identity says {attrs['layers']}")
    f = h5py.File(partial, "w")
    try:
        f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        group = f.create_group("layers")
        for name, t in layers.items():
            h, w, c = t.shape[1:]
            group.create_dataset(name, shape=(n, h, w, c), dtype=dtype, chunks=(1, h, w, c), compression=compression)
        if cls is not None:
            f.create_dataset("cls", shape=(n, cls.shape[1]), dtype="float32")
        f.attrs["n_done"] = 0
        _encode_attrs(f.attrs, attrs)  # last: a file killed before this point fails the resume check
        f.flush()
    except BaseException:
        f.close()
        raise
    return f


def _write_rows(f, partial, a, b, layers, cls, dtype) -> None:
    for name, t in layers.items():
        ds = f[f"layers/{name}"]
        arr = t.detach().float().cpu().numpy().astype(dtype)
        if arr.shape != (b - a,) + ds.shape[1:]:
            raise ValueError(f"{partial}: layer {name!r} rows {a}:{b} have shape {arr.shape}, expected {ds.shape[1:]}")
        if not np.isfinite(arr).all():
            raise ValueError(f"layer {name!r} of images {a}:{b} is not finite in {dtype} (use dtype float32?)")
        ds[a:b] = arr
    if cls is not None:
        f["cls"][a:b] = cls.detach().float().cpu().numpy()


def _prefetched_batches(paths, start, batch_size, backbone, workers) -> Iterator:
    """Yield ``((a, b), preprocessed batch)`` from ``start``; decoding runs ahead in threads."""
    from .data.index import load_image

    def load(a, b):
        return backbone.preprocess([load_image(p) for p in paths[a:b]])

    ranges = [(a, min(a + batch_size, len(paths))) for a in range(start, len(paths), batch_size)]
    if workers <= 0:
        for a, b in ranges:
            yield (a, b), load(a, b)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="features-load")
    try:
        pending = deque()
        todo = iter(ranges)
        for r in todo:
            pending.append((r, pool.submit(load, *r)))
            if len(pending) > workers:  # keep `workers + 1` batches in flight
                break
        while pending:
            r, fut = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load, *nxt)))
            yield r, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------- read
def read_features(
    path: str | os.PathLike,
    layers: list[str] | None = None,
    expect: dict | None = None,
    dtype: str | None = "float32",
) -> Features:
    """Read a cache (all layers, or ``layers``) into a :class:`Features`.

    ``expect``: attributes the configuration requires (``{"backbone": ..., "resolution": ...}``);
    a missing or different one raises ``ValueError`` naming the key. ``dtype=None`` keeps the
    stored dtype (float16 halves the memory of the paper's ViT-L features).
    """
    import h5py

    path = _existing(path)
    with h5py.File(path, "r") as f:
        attrs = _decode_attrs(f.attrs)
        if attrs.get("format") != FORMAT:
            raise ValueError(f"{path}: not a feature cache of format {FORMAT!r} (format={attrs.get('format')!r})")
        check_attrs(attrs, expect, str(path))
        n = int(attrs["n_images"])
        if int(attrs.get("n_done", -1)) != n:
            raise ValueError(f"{path}: holds {attrs.get('n_done')} of {n} images (incomplete cache)")
        names = list(attrs["layers"]) if layers is None else [str(v) for v in layers]
        for name in names:
            if f"layers/{name}" not in f:
                raise ValueError(f"{path}: no layer {name!r}; the cache holds {attrs['layers']}")
        ids = f["ids"].asstr()[()].tolist()
        out = {}
        for name in names:
            data = f[f"layers/{name}"][()]
            out[name] = data if dtype is None else data.astype(dtype, copy=False)
        cls = f["cls"][()] if "cls" in f else None
    return Features(ids=ids, layers=out, cls=cls, attrs=attrs)


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        hint = " (an extraction is in progress or was interrupted: rerun it)" if Path(f"{path}.partial").exists() else ""
        raise FileNotFoundError(f"feature cache {path} does not exist{hint}")
    return path
