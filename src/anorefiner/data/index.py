"""Dataset index and image/mask loading for MVTec-layout folders (docs/architecture.md "Dataset index").

Layout: ``<root>/<category>/train/good/*``, ``<root>/<category>/test/<defect>/*`` and
``<root>/<category>/ground_truth/<defect>/<stem>_mask.png``. VisA converted to this layout may
name its masks ``<stem>.png``; that name is accepted when ``<stem>_mask.png`` is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from ..log import LOG

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
SPLITS = ("test", "train")
COLUMNS = ["dataset", "category", "split", "label", "defect", "image_id", "image_path", "mask_path"]


class DatasetError(ValueError):
    """A dataset folder or file that breaks the MVTec layout (message names the path)."""


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_categories(root: str | Path) -> list[str]:
    """Sorted names of the category folders under ``root`` (folders holding ``train/`` or ``test/``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder")
    return [p.name for p in _subdirs(root) if (p / "train").is_dir() or (p / "test").is_dir()]


def _find_mask(cat_dir: Path, defect: str, stem: str) -> Path | None:
    folder = cat_dir / "ground_truth" / defect
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        if (folder / name).is_file():
            return folder / name
    return None


def _rows_for(cat_dir: Path, split: str, defect_dirs: list[Path], check_sizes: bool = True) -> list[dict]:
    rows = []
    for folder in defect_dirs:
        defect = folder.name
        seen: dict[str, Path] = {}
        for path in sorted(p for p in folder.iterdir() if _is_image(p)):
            if path.stem in seen:
                raise DatasetError(
                    f"two images share the id {split}/{defect}/{path.stem}: {seen[path.stem]} and {path}"
                )
            seen[path.stem] = path
            label = 0 if defect == "good" else 1
            mask = None
            if label:
                mask = _find_mask(cat_dir, defect, path.stem)
                if mask is None:
                    expected = cat_dir / "ground_truth" / defect / f"{path.stem}_mask.png"
                    raise DatasetError(f"anomalous image {path} has no mask (expected {expected})")
                if check_sizes:
                    check_mask_size(path, mask)
            rows.append(
                {
                    "split": split,
                    "label": label,
                    "defect": defect,
                    "image_id": f"{split}/{defect}/{path.stem}",
                    "image_path": str(path),
                    "mask_path": None if mask is None else str(mask),
                    "_name": path.name,
                }
            )
    return rows


def index_category(
    root: str | Path, category: str, dataset: str = "mvtec_ad", split: str | None = None,
    check_sizes: bool = True,
) -> pd.DataFrame:
    """One row per image of ``<root>/<category>``, in index order (split, defect, file name).

    Columns: ``dataset, category, split, label, defect, image_id, image_path, mask_path``;
    ``mask_path`` is None for good images (a mask next to a good image is ignored).
    ``split``: None (both), ``"train"`` or ``"test"``. ``check_sizes``: every mask must have its
    image's size (read from the file headers, so before any compute); a mismatch raises
    :class:`DatasetError` naming the mask and both sizes.
    """
    root = Path(root)
    if split not in (None, *SPLITS):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    cat_dir = root / category
    if not cat_dir.is_dir():
        available = list_categories(root)
        raise FileNotFoundError(
            f"category {category!r} not found under {root}; available: {', '.join(available) or '(none)'}"
        )
    rows: list[dict] = []
    for sp in SPLITS if split is None else (split,):
        sp_dir = cat_dir / sp
        if not sp_dir.is_dir():
            raise FileNotFoundError(f"missing folder {sp_dir}")
        if sp == "train":  # only normal images are used from train (zero-shot reference / demo)
            good = sp_dir / "good"
            if not good.is_dir():
                raise FileNotFoundError(f"missing folder {good}")
            defect_dirs = [good]
        else:
            defect_dirs = _subdirs(sp_dir)
        sp_rows = _rows_for(cat_dir, sp, defect_dirs, check_sizes)
        if not sp_rows:
            raise DatasetError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {sp_dir}")
        rows.extend(sp_rows)
    frame = pd.DataFrame(rows).sort_values(["split", "defect", "_name"], kind="stable").drop(columns="_name")
    frame.insert(0, "category", category)
    frame.insert(0, "dataset", dataset)
    frame["label"] = frame["label"].astype(int)
    frame["mask_path"] = frame["mask_path"].astype(object).where(frame["mask_path"].notna(), None)
    return frame[COLUMNS].reset_index(drop=True)


def test_rows(root: str | Path, category: str, ids: list[str], dataset: str = "mvtec_ad") -> pd.DataFrame:
    """The index's test rows of ``category`` in the order of ``ids`` (a cache's or store's ids),
    indexed by image id; ids with no image under ``root`` raise an error naming the first one."""
    df = index_category(root, category, dataset=dataset, split="test").set_index("image_id")
    missing = [i for i in ids if i not in df.index]
    if missing:
        raise ValueError(f"{len(missing)} image id(s) have no test image under {root}/{category}: "
                         f"first {missing[0]!r}")
    return df.loc[list(ids)]


def index_dataset(
    root: str | Path,
    categories: list[str] | tuple[str, ...] | None = None,
    dataset: str = "mvtec_ad",
    split: str | None = None,
) -> pd.DataFrame:
    """:func:`index_category` for each category (all under ``root`` when None), concatenated."""
    cats = list_categories(root) if categories is None else list(categories)
    if not cats:
        raise FileNotFoundError(f"no category folders (with train/ or test/) under {root}")
    frames = [index_category(root, c, dataset=dataset, split=split) for c in cats]
    return pd.concat(frames, ignore_index=True)


def read_index(path: str | Path) -> pd.DataFrame:
    """Read an index CSV written by ``anorefiner index`` (empty mask cells become None)."""
    frame = pd.read_csv(path, dtype={"mask_path": object, "defect": str, "image_id": str})
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetError(f"index file {path} lacks columns {missing}")
    frame["mask_path"] = frame["mask_path"].astype(object).where(frame["mask_path"].notna(), None)
    return frame[COLUMNS]


def _open(path: str | Path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"cannot read {what} {path}: {err}") from err
    return img


def _to_uint8(img: Image.Image) -> np.ndarray:
    """Pixel values as uint8 with 16-bit / 32-bit / float modes rescaled to 0..255."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float64)
        scale = 257.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 1.0
        return np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8)
    if img.mode == "F":
        arr = np.asarray(img, np.float64)
        arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if img.mode == "1":
        return np.asarray(img.convert("L"))
    if img.mode in ("L", "RGB"):
        return np.asarray(img)
    return np.asarray(img.convert("RGB"))  # P, RGBA, LA, CMYK, YCbCr: alpha is dropped


def load_image(path: str | Path) -> np.ndarray:
    """An image as ``uint8 [H,W,3]`` RGB (grey, palette, RGBA and 16-bit images converted)."""
    arr = _to_uint8(_open(path, "image"))
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr)


def load_mask(path: str | Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """A ground-truth mask as ``bool [H,W]``.

    Threshold: masks whose maximum is >= 128 (MVTec's 0/255, possibly with interpolation or JPEG
    noise) are anomalous where value >= 128; masks with a smaller maximum (0/1 or instance labels
    such as VisA's) are anomalous where value > 0. 16-bit masks are compared on the 8-bit scale
    (value / 257) unless they hold only 0/1; colour masks use their brightest channel.
    ``expected_size`` is the image's ``(H, W)``; a mismatch raises naming both sizes and the file.
    """
    img = _open(path, "mask")
    if img.mode in ("1", "L", "P", "F") or img.mode.startswith("I"):
        arr = np.asarray(img).astype(np.float64)  # raw values: a 16-bit 0/1 mask must stay 0/1
    else:
        arr = np.asarray(img.convert("RGB")).max(axis=2).astype(np.float64)
    if arr.max(initial=0) > 255:  # 16-bit 0/65535 masks
        arr = arr / 257.0
    if expected_size is not None and tuple(arr.shape) != tuple(expected_size):
        raise DatasetError(
            f"mask {path} is {arr.shape[0]}x{arr.shape[1]} (HxW) but its image is "
            f"{expected_size[0]}x{expected_size[1]}"
        )
    return arr >= 128 if arr.max(initial=0) >= 128 else arr > 0


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image from its header (no decoding)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"cannot read image {path}: {err}") from err
    return h, w


def check_mask_size(image_path: str | Path, mask_path: str | Path) -> None:
    """Raise :class:`DatasetError` naming the mask and both sizes when they differ (headers only)."""
    image_hw = image_size(image_path)
    try:
        with Image.open(mask_path) as img:
            mask_hw = (img.size[1], img.size[0])
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"cannot read mask {mask_path}: {err}") from err
    if mask_hw != image_hw:
        raise DatasetError(f"mask {mask_path} is {mask_hw[0]}x{mask_hw[1]} (HxW) but its image {image_path} is "
                           f"{image_hw[0]}x{image_hw[1]}: masks must have their image's size")


def check_category(df: pd.DataFrame, max_errors: int = 20) -> dict:
    """Check an index: every image readable; every anomalous test image has a readable mask of
    its image's size. Raises :class:`DatasetError` listing the problems; returns counts."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DatasetError(f"index lacks columns {missing}")
    problems: list[str] = []
    empty_masks = 0
    for row in df.itertuples(index=False):
        try:
            if row.label != 1:
                image_size(row.image_path)
                continue
            size = load_image(row.image_path).shape[:2]
            if row.mask_path is None or (isinstance(row.mask_path, float) and np.isnan(row.mask_path)):
                raise DatasetError(f"anomalous image {row.image_path} has no mask")
            if not load_mask(row.mask_path, expected_size=size).any():
                empty_masks += 1
                LOG.warning("mask %s of anomalous image %s is empty", row.mask_path, row.image_path)
        except (DatasetError, FileNotFoundError) as err:
            problems.append(str(err))
            if len(problems) >= max_errors:
                break
    if problems:
        more = " (stopped at the first %d)" % max_errors if len(problems) >= max_errors else ""
        raise DatasetError(f"{len(problems)} problem(s) in the dataset index{more}:\n  " + "\n  ".join(problems))
    return {
        "images": int(len(df)),
        "train": int((df["split"] == "train").sum()),
        "test": int((df["split"] == "test").sum()),
        "anomalous": int((df["label"] == 1).sum()),
        "empty_masks": empty_masks,
    }
