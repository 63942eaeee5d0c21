"""Where the three datasets come from, and what their folders must look like on disk.

URLs and SHA-256 sums are those of ``shared/specs/datasets.md``. The older MVTec address
(``.../shares/38536/...``) answers 404 and is deliberately absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

MVTEC_AD_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip

VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip


@dataclass(frozen=True)
class DatasetSource:
    """One downloadable dataset archive."""

    name: str  # dataset name used in config keys (``datasets.<name>``) and paths
    url: str  # official address
    filename: str  # archive file name under ``resources/downloads/<name>/``
    sha256: str  # verified before anything is extracted
    layout: str  # "mvtec" (extract as is), "visa" (convert with split_csv/1cls.csv), "textures"
    categories: tuple[str, ...]  # categories in MVTec layout after preparation (empty for DTD)
    approx_size: str  # shown in log messages so a user knows what to expect
    md5: str | None = None  # published by the host; informational only (SHA-256 is what is checked)
    licence: str = ""  # the data's own terms (docs/datasets.md), logged before a download; not the code's MIT licence


SOURCES: dict[str, DatasetSource] = {
    "mvtec_ad": DatasetSource(
        name="mvtec_ad",
        url=(
            "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/"
            "420938113-1629960298/mvtec_anomaly_detection.tar.xz"
        ),
        filename="mvtec_anomaly_detection.tar.xz",
        sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        layout="mvtec",
        categories=MVTEC_AD_CATEGORIES,
        approx_size="4.9 GB",
        licence="CC BY-NC-SA 4.0 (non-commercial; cite Bergmann et al., CVPR 2019)",
    ),
    "visa": DatasetSource(
        name="visa",
        url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
        filename="VisA_20220922.tar",
        sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
        layout="visa",
        categories=VISA_CATEGORIES,
        approx_size="1.8 GB",
        licence="CC BY 4.0 (cite Zou et al., ECCV 2022)",
    ),
    "dtd": DatasetSource(
        name="dtd",
        url="https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
        filename="dtd-r1.0.1.tar.gz",
        sha256="e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205",
        layout="textures",
        categories=(),
        approx_size="600 MB",
        licence="research use only (cite Cimpoi et al., CVPR 2014)",
        md5="fff73e5086ae6bdbea199a49dfb8a4c1",
    ),
}


def get_source(name: str) -> DatasetSource:
    """The :class:`DatasetSource` called ``name``; unknown names raise ``ValueError`` listing the known ones."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(SOURCES))}") from None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def validate_mvtec_root(root: str | Path, categories: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """Check that ``root`` is in MVTec layout and return its category names (sorted).

    Expected per category: ``train/good/`` with images, ``test/<defect>/`` with images, and for
    every non-``good`` test image ``ground_truth/<defect>/<stem>_mask.png``. With ``categories``
    given, each must be present; otherwise every sub-folder holding ``train/`` or ``test/`` counts.
    Raises ``FileNotFoundError`` that lists everything missing (at most a few examples per kind).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder")
    if categories is None:
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir()))
        if not names:
            raise FileNotFoundError(
                f"{root} holds no category folders in MVTec layout "
                f"(expected {root}/<category>/train/good/*.png and {root}/<category>/test/<defect>/*.png)"
            )
    else:
        names = list(categories)
    problems: list[str] = []
    for name in names:
        problems.extend(_category_problems(root / name))
    if problems:
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise FileNotFoundError(
            f"{root} is not a complete MVTec-layout dataset; missing:\n  " + "\n  ".join(shown) + more
        )
    return sorted(names)


def _category_problems(cat: Path) -> list[str]:
    if not cat.is_dir():
        return [f"{cat}/ (category folder)"]
    problems = []
    train = cat / "train" / "good"
    if not train.is_dir():
        problems.append(f"{train}/")
    elif not _images(train):
        problems.append(f"{train}/*.png (no training images)")
    test = cat / "test"
    if not test.is_dir():
        return problems + [f"{test}/"]
    defects = sorted(p for p in test.iterdir() if p.is_dir())
    if not defects:
        problems.append(f"{test}/<defect or good>/ (no test folders)")
    for folder in defects:
        images = _images(folder)
        if not images:
            problems.append(f"{folder}/*.png (no test images)")
        if folder.name == "good":
            continue
        gt = cat / "ground_truth" / folder.name
        missing = [gt / f"{img.stem}_mask.png" for img in images if not (gt / f"{img.stem}_mask.png").is_file()]
        if missing:
            problems.append(f"{missing[0]}" + (f" (and {len(missing) - 1} more masks)" if len(missing) > 1 else ""))
    return problems


def dtd_texture_paths(root: str | Path) -> list[Path]:
    """All DTD texture images (sorted), from ``root/images/<class>/*.jpg`` or ``root/dtd/images/...``.

    ``root`` is the folder the DTD archive was extracted into (the archive holds ``dtd/images``).
    """
    root = Path(root)
    for images in (root / "images", root / "dtd" / "images"):
        if images.is_dir():
            paths = sorted(p for p in images.glob("*/*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            if not paths:
                raise FileNotFoundError(f"no DTD images in {images} (expected {images}/<class>/*.jpg)")
            return paths
    raise FileNotFoundError(
        f"no DTD images under {root}: expected {root}/dtd/images/<class>/*.jpg or {root}/images/<class>/*.jpg"
    )
