"""Options of ``anorefiner stream`` (docs/stream.md); PGT's own: :class:`~anorefiner.refine.pgt.RefinerOptions`."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class StreamConfig:
    """Stream options (``--stream-options`` JSON; the CLI flags set the same fields)."""

    # MuSc: references of each image = the `window` images before it. 30 = u, PGT's group size: MuSc* (the
    # paper's grouped MuSc, Table 1) scores each image against the 29 other images of its group of 30. A longer
    # window costs linearly more per image.
    window: int = 30
    # MuSc: the first min_references + 1 images wait until that many have arrived and are scored against each
    # other. 4 is the smallest reference set on which MuSc's mean of the int(0.3·n) smallest distances is
    # defined without the fallback k = 1 (int(0.3·3) = 0).
    min_references: int = 4
    # Train the ARD on the pseudo-anomalies of each complete group (PGT). False: coarse maps only (backends PGT
    # cannot refine, e.g. AnomalyCLIP, AdaCLIP, WinCLIP, which score images rather than cached features).
    refine: bool = True
    # Wait, before scoring the first image of group k+1, until the ARD trained on group k is in service.
    # False (production): scoring never waits; an image gets the newest ARD in service (the results log says
    # which group it was trained on). True: deterministic, for the equivalence test and reruns (docs/stream.md).
    wait_for_ard: bool = False
    eval_resolution: int = 256  # side of the stored maps (the refined store's E; MuSc's official 518 on GPU)
    overlay: bool = True  # write a PNG overlay per image
    # Images of another height x width than this are skipped (logged). None: the size of the first image.
    image_size: tuple | None = None
    poll_s: float = 0.5  # folder polling interval
    # Stop when no new image arrived for this long (seconds). None: never (a production line stops by signal).
    idle_timeout_s: float | None = None
    max_images: int | None = None  # stop once the results log holds this many scored images (over restarts)
    # CPU threads of torch in the scoring (main) thread and the training thread. They run at the same time, so
    # the two together should not exceed the cores; None: the cores torch sees (OMP_NUM_THREADS) split in two.
    score_threads: int | None = None
    train_threads: int | None = None
    extensions: tuple = IMAGE_EXTENSIONS

    def validate(self) -> None:
        for key in ("window", "min_references", "eval_resolution"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"stream.{key}={getattr(self, key)!r}: must be >= 1")
        if self.min_references > self.window:
            raise ValueError(f"stream.min_references={self.min_references} exceeds stream.window={self.window}")
        for key in ("score_threads", "train_threads", "max_images"):
            value = getattr(self, key)
            if value is not None and int(value) < 1:
                raise ValueError(f"stream.{key}={value!r}: must be >= 1 or null")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(f"stream.image_size={self.image_size!r}: expected [height, width]")
        if self.poll_s <= 0:
            raise ValueError(f"stream.poll_s={self.poll_s!r}: must be > 0")


def check_pgt_online(options) -> None:
    """PGT options that need a whole group (or the whole test set) before its first image is answered cannot
    run on a stream: raise ``ValueError`` naming the key."""
    p = options.pgt
    if p.coarse_norm not in ("first_group", "none"):
        raise ValueError(f"pgt.coarse_norm={p.coarse_norm!r} scales a group by its own (or later) maps, unknown "
                         "while its images arrive; the stream runs 'first_group' or 'none'")
    if p.query_references not in ("backend", "group"):
        raise ValueError(f"pgt.query_references={p.query_references!r} scores pseudo-anomalies against every image "
                         "seen (unbounded on a stream); use 'backend' or 'group'")
    if p.schedule != "progressive":
        raise ValueError(f"pgt.schedule={p.schedule!r}: the stream trains progressively (Table 7 (d)) only")
    if p.safeguard:
        raise ValueError("pgt.safeguard: not supported by the stream mode")
    if p.contamination_ratio > 0:
        raise ValueError("pgt.contamination_ratio > 0 reads ground-truth labels (Table 4 ablation); a stream has none")
