"""Progressive Group-wise Test-time Training (PGT), AnoRefiner Sec. 3.2, Fig. 6, Eq. 4, Tables 4, 6, 7, 9.

For one category, the test images are split into ``ceil(N/u)`` groups
(:func:`anorefiner.zsad.groups.make_groups`; seeded shuffled order by default, see ``PGTConfig.group_order``).
One ARD is trained progressively (:class:`~anorefiner.refine.trainer.Trainer`):

1. group k is refined by the ARD trained on groups < k (group 1: see ``PGTConfig.first_group_ard``; the
   paper keeps its coarse map, the default refines it with the ARD trained on its own pseudo-anomalies);
2. pseudo-normal selection: the r images of group k with the lowest coarse-map maximum;
3. l pseudo-anomalies per pseudo-normal image (:mod:`.synthesis`); their features come from the real
   backbone and their coarse maps from the backend's ``score_queries`` against the images the backend
   scored their source against (``PGTConfig.query_references``; the source image excluded);
4. the ARD is trained on them with the Dice loss (Eq. 4) for ``epochs`` epochs, SGD; then its BatchNorm
   statistics are recomputed with the final weights (``PGTConfig.bn_recalibrate``).

Outputs per image (Table 9): ``coarse`` (the backend map upsampled bilinearly with align_corners=True, as the
metrics stage does), ``ard`` (sigmoid of the ARD logits; a stand-in in group 1 unless it is refined) and
``combined`` (:mod:`.combine`, ``PGTConfig.combine``: the paper's mean, or by default the gate in which the ARD
can only lower the coarse map, after the ARD is calibrated per group onto the coarse scale, ``PGTConfig.calibration``;
a group the optional safeguard keeps coarse gets the map of an ARD that says nothing, calibrated alike,
:mod:`.safeguard`). Coarse maps are normalised before entering the ARD and before they are combined
(``PGTConfig.coarse_norm``); the ``coarse`` output itself stays raw so its metrics equal the backend's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..log import LOG
from ..seeding import rng as make_rng
from ..metrics.evaluate import resize_maps
from . import safeguard
from .ard import ARDConfig
from .combine import CALIBRATIONS, COMBINE_RULES, calibrate, calibration_map, combine
from .store import Refined
from .synthesis import SynthesisConfig
from .trainer import LOSSES, CoarseNorm, Trainer

SCHEDULES = ("progressive", "one_group", "same_anomalies", "same_normals")
COARSE_NORMS = ("first_group", "running_minmax", "group_minmax", "none")
FIRST_GROUP = ("zeros", "coarse", "self")
QUERY_REFERENCES = ("backend", "group", "seen", "all")


@dataclass
class PGTConfig:
    """Options of PGT (section ``pgt`` of ``--options``; variants override these)."""

    group_size: int = 30  # u (paper Sec. 4; Table 10)
    # Order in which images enter the groups. "index" = docs/architecture.md index order, which is sorted by
    # defect type: on MVTec bottle group 1 then holds no good image at all and every pseudo-normal image of
    # groups 1-2 is defective, so the ARD learns real defects as "normal". "shuffled" = a seeded permutation
    # (make_groups(n, u, seed=run seed)), the mixed stream a production line gives and the paper simulates;
    # MuSc* gets identical groups with its group_order="shuffled" and the same seed.
    group_order: str = "shuffled"
    n_pseudo_normal: int = 5  # r (Table 6)
    n_anomalies_per_normal: int = 4  # l (Table 6)
    epochs: int = 20  # per group (paper Sec. 4)
    # Epochs of group 1 alone (None: ``epochs``). Group 1's ARD starts from random weights while later groups
    # continue from the previous ARD, yet under first_group_ard "self" it refines group 1 too; on transistor its
    # loss ended at 0.37 against 0.17-0.20 for later groups (issue 26). Measured: docs/refiner_audit.md.
    first_group_epochs: int | None = None
    lr: float = 1e-3  # SGD (paper Sec. 4)
    momentum: float = 0.9  # not given; plain SGD at lr 1e-3 barely moves in 20 short epochs, 0.9 is the usual value
    weight_decay: float = 0.0  # not given
    batch_size: int = 4  # not given; 20 pseudo-anomalies per group → 5 steps per epoch
    schedule: str = "progressive"  # Table 7: "progressive" (d), "one_group" (a), "same_anomalies" (b), "same_normals" (c)
    # Table 4 ONLY: this share of the r pseudo-normal slots is forced to truly anomalous images. This is the
    # one place PGT reads ground-truth labels; 0 (default) never touches them.
    contamination_ratio: float = 0.0
    # Scale shared by coarse maps (ARD input, mean with the ARD output). "first_group": the min/max of group 1's
    # coarse maps, then frozen: online (group 1 is seen before anything is refined) and one affine map for the
    # whole category, so the coarse half of the combined maps ranks pixels across groups exactly as the backend
    # does and the ARD sees one input scale in every group. "running_minmax": min/max over all groups seen so
    # far (the scale drifts from group to group: on bottle pixel F1-max fell 1.0 point below "none").
    # "group_minmax": each group's own min/max. "none": raw values (only for backends already in [0,1]).
    coarse_norm: str = "first_group"
    # References of the pseudo-anomalies' coarse maps. "backend" (default): the images the backend scored the
    # source image against (``Backend.reference_indices``: MuSc its whole test set, MuSc* the source's group of
    # 30, PA-CLIP every image; backends without it: the current group), so a pseudo-anomaly's coarse map is
    # made as its real images' are. "group" (the previous default) scored musc_cnn's pseudo-anomalies against 24
    # references while its real images had 99 (transistor, issue 26). "seen": groups up to the current one;
    # "all": every test image.
    query_references: str = "backend"
    # Image score of "ard"/"combined": "max" of the map (as the paper scores coarse maps, Sec. 3.2); "coarse"
    # keeps the backend's image score for every method. The "coarse" method always keeps the backend score.
    image_score: str = "max"
    # "topk": the mean of the image_topk fraction of a map's highest pixels. Robust to a few confident false-positive
    # pixels of the ARD (bottle, 6 runs, recomputed from stored maps: image AUROC 99.1-100 against 96.9-99.7 for "max"), but it dilutes defects
    # smaller than that fraction of the image, so it is not the default.
    image_topk: float = 0.01
    # Add the r pseudo-normal images themselves (empty masks) to the training set. The paper trains on the
    # r·l pseudo-anomalies only; then every training image holds an anomaly and the ARD learns to always segment
    # something, which shows up as false positives on the normal test images: on transistor it fired above 0.9 on
    # leads and holes of half the good images (issue 26). Default True, measured with the gate + isotonic final map
    # (offline textures, seeds 0-2; docs/refiner_audit.md): transistor pixel AP 52.4/52.4/53.0 -> 53.6/53.4/54.0
    # (coarse 53.2: now above it in every seed), bottle 84.8/84.0/84.6 -> 83.3/83.4/84.0 (coarse 82.1). It trades
    # ~1 point on bottle for never falling below the coarse map on transistor. False: the paper's rule.
    train_on_normals: bool = True
    # What stands in for the ARD output in group 1 (no ARD trained yet). Paper Sec. 3.2: group 1's final maps are its
    # coarse maps. "zeros": an ARD that detects nothing, so combined = coarse/2, which is the coarse map on the scale
    # of later groups' combined maps (their ARD half is ~0 on normal pixels); per image it ranks pixels exactly as
    # the coarse map. "coarse": combined = coarse, twice that scale: pooled pixel metrics then rank group 1's normal
    # pixels above later groups' anomalies (bottle, EfficientNet-Lite0, MuSc: pixel AP 71.8 against 83.6 for zeros).
    # "self" (default): group 1 is refined by the ARD trained on group 1's own pseudo-anomalies (ordinary test-time
    # training: adapt on the batch, then predict it), so every group's maps come from an ARD and share one scale. This
    # departs from the paper's group-1 rule ("coarse" is that rule, kept for reproduction): with "zeros", pooled image
    # AUROC fell to 93.4 because group 1's maxima (coarse/2) sat below later groups' good images, whose maxima the ARD
    # raises; with "self" it is 98.9-99.7 and pixel AP rises more (bottle, docs/refiner_audit.md).
    first_group_ard: str = "self"
    # Training loss. "dice": Eq. 4 exactly. "dice_bce" / "dice_focal": Eq. 4 plus a per-pixel binary cross-entropy
    # (or its focal form, gamma 2, as APRIL-GAN trains its maps). Dice alone is blind to how confident a pixel is:
    # it pushes outputs to 0/1, and a confident false positive then outranks true defects in pooled pixel metrics.
    loss: str = "dice"
    # BatchNorm running statistics are recomputed after each group's training: one no-gradient pass over the
    # group's training set with the final weights (cumulative average, "precise BN"). Without it the ARD is
    # evaluated with running averages of the last ~10 SGD steps' batch statistics, taken while the weights were
    # still moving: on transistor (seed 0) group 1's ARD had eval-mode Dice loss 0.62 on its own training images
    # against 0.38 in train mode (issue 26). No effect when ``ard.norm`` is "none".
    bn_recalibrate: bool = True
    # Final map from the normalised coarse map and the ARD map (refine/combine.py). "mean": the paper's average
    # (Sec. 3.2). "gate" (default): coarse_n·(1 + ARD)/2, the ARD may halve a coarse score but never raise it. The
    # paper assigns false positives to the coarse map and false negatives to the ARD; the mean also lets the ARD's
    # false positives add 0.5 anywhere, which is how transistor lost (issue 26).
    combine: str = "gate"
    # The ARD map of each group mapped onto its coarse maps' scale before the combination, from the group's own
    # real images and no label (refine/combine.py). "isotonic" (default): E[coarse_n | ARD], so the ARD counts as
    # far as the coarse map follows it on real images (on transistor it does not: its maps become nearly flat
    # and the group keeps its coarse ranking). "quantile": the coarse distribution. "none": the paper's.
    # The stored "ard" output stays uncalibrated (Table 9's ARD alone).
    # Both defaults were chosen among the six parameter-free rules {mean, gate} x {none, quantile, isotonic}
    # recomputed on 10 stored runs (refine_derived.py; bottle 6, transistor 4; docs/refiner_audit.md): pixel AP
    # bottle 83.8 (mean, none) -> 84.5, transistor 48.1 -> 52.6 (coarse 82.1 / 53.2), image AUROC 99.1 -> 99.8
    # and 92.1 -> 96.1 (coarse 99.9 / 94.7). Neither has a constant to tune.
    calibration: str = "isotonic"
    # Upsampling of the coarse half of "combined" (patch grid -> evaluation resolution). True: corner-aligned, as
    # MuSc's and APRIL-GAN's official code upsample their maps (and the "coarse" output always is); False:
    # pixel-centred, the geometry of the ARD's own output. The two halves used to differ (issue 26: up to 3.5 px at
    # the borders); measured on the stored maps: docs/refiner_audit.md.
    coarse_align_corners: bool = True
    # The safeguard (refine/safeguard.py, not in the paper): an ARD refines a group only if, on held-back
    # pseudo-anomalies plus the group's pseudo-normal images, its combined map beats the coarse map in pixel AP
    # by more than safeguard_margin; otherwise the group keeps its coarse map. Off by default: on bottle and
    # transistor it never triggered (the ARD beats the coarse map on pseudo-anomalies by 0.16-0.31 AP in every
    # group, and does not fire on the r most normal-looking images), so it did not stop transistor's loss;
    # docs/refiner_audit.md.
    safeguard: bool = False
    safeguard_holdout: int = 1  # held-back pseudo-anomalies per pseudo-normal image (own seeded stream, never trained on)
    safeguard_margin: float = 0.0  # pixel AP points (as a fraction) combined must gain over coarse
    train_last_group: bool = False  # training after the last group changes no output; True only for timing
    amp: bool = False  # mixed precision on CUDA (ignored on CPU)
    feature_batch_size: int = 16  # backbone batch for pseudo-anomaly features

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"pgt.schedule={self.schedule!r}: expected one of {SCHEDULES}")
        if self.group_order not in ("index", "shuffled"):
            raise ValueError(f"pgt.group_order={self.group_order!r}: expected 'index' or 'shuffled'")
        if self.first_group_ard not in FIRST_GROUP:
            raise ValueError(f"pgt.first_group_ard={self.first_group_ard!r}: expected one of {FIRST_GROUP}")
        if self.coarse_norm not in COARSE_NORMS:
            raise ValueError(f"pgt.coarse_norm={self.coarse_norm!r}: expected one of {COARSE_NORMS}")
        if self.query_references not in QUERY_REFERENCES:
            raise ValueError(f"pgt.query_references={self.query_references!r}: expected one of {QUERY_REFERENCES}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"pgt.calibration={self.calibration!r}: expected one of {CALIBRATIONS}")
        if self.combine not in COMBINE_RULES:
            raise ValueError(f"pgt.combine={self.combine!r}: expected one of {COMBINE_RULES}")
        if self.loss not in LOSSES:
            raise ValueError(f"pgt.loss={self.loss!r}: expected one of {LOSSES}")
        if self.image_score not in ("max", "coarse", "topk"):
            raise ValueError(f"pgt.image_score={self.image_score!r}: expected 'max', 'topk' or 'coarse'")
        if not 0.0 < float(self.image_topk) <= 1.0:
            raise ValueError(f"pgt.image_topk={self.image_topk!r}: expected a fraction in (0, 1]")
        if not 0.0 <= self.contamination_ratio <= 1.0:
            raise ValueError(f"pgt.contamination_ratio={self.contamination_ratio!r}: expected 0..1")
        for key in ("group_size", "n_pseudo_normal", "n_anomalies_per_normal", "batch_size", "feature_batch_size",
                    "safeguard_holdout"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"pgt.{key}={getattr(self, key)!r}: must be >= 1")
        for key in ("epochs", "first_group_epochs"):
            if getattr(self, key) is not None and int(getattr(self, key)) < 0:
                raise ValueError(f"pgt.{key}={getattr(self, key)!r}: must be >= 0")


@dataclass
class RefinerOptions:
    """The ``--options`` JSON of ``anorefiner pgt``: sections ``ard``, ``pgt``, ``synthesis``."""

    ard: ARDConfig = field(default_factory=ARDConfig)
    pgt: PGTConfig = field(default_factory=PGTConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)

    def validate(self) -> None:
        self.ard.validate()
        self.pgt.validate()
        self.synthesis.validate()


def select_pseudo_normals(maps: np.ndarray, group: np.ndarray, r: int, *, contamination_ratio: float = 0.0,
                          labels=None, gen: np.random.Generator | None = None) -> np.ndarray:
    """Indices (into the category) of the r group images with the lowest coarse-map maximum (Sec. 3.2).

    With ``contamination_ratio > 0`` (Table 4 ablation ONLY) ``round(ratio·r)`` slots are first filled with
    randomly drawn truly anomalous images of the group (``labels``); ``labels`` is not read otherwise.
    """
    r = min(int(r), len(group))
    scores = maps[group].reshape(len(group), -1).max(1)
    order = group[np.argsort(scores, kind="stable")]
    if contamination_ratio <= 0:
        return np.sort(order[:r])
    if labels is None:
        raise ValueError("pgt.contamination_ratio > 0 (Table 4 ablation) needs ground-truth labels")
    n_forced = int(round(contamination_ratio * r))
    anomalous = np.asarray([int(i) for i in group if int(labels[int(i)]) == 1], dtype=np.int64)
    if len(anomalous) < n_forced:
        LOG.warning("CONTAMINATION ABLATION: group has only %d anomalous images for %d slots", len(anomalous), n_forced)
    gen = gen or np.random.default_rng(0)
    forced = gen.choice(anomalous, size=min(n_forced, len(anomalous)), replace=False) if len(anomalous) else []
    rest = [int(i) for i in order if int(i) not in set(int(f) for f in forced)][: r - len(forced)]
    return np.sort(np.asarray(list(forced) + rest, dtype=np.int64))


def run_pgt(feats, coarse, images: Sequence, backbone, backend, options: RefinerOptions | None = None, *,
            seed: int = 0, textures: Sequence = (), eval_resolution: int = 256, labels=None,
            device: str | torch.device = "cpu") -> Refined:
    """PGT for one category (module doc). ``images``: paths or uint8 arrays in index order (``feats.ids``).

    ``labels`` (0/1 per image) are read only when ``options.pgt.contamination_ratio > 0`` (Table 4).
    Returns a :class:`~anorefiner.refine.store.Refined` with maps at ``eval_resolution``.
    """
    options = options or RefinerOptions()
    options.validate()
    p = options.pgt
    n = len(feats.ids)
    if list(coarse.ids) != list(feats.ids):
        raise ValueError("run_pgt: coarse store ids differ from feature cache ids (different category or order?)")
    if len(images) != n:
        raise ValueError(f"run_pgt: {len(images)} images given for {n} feature-cache ids")
    if p.contamination_ratio > 0:
        if labels is None:
            raise ValueError("pgt.contamination_ratio > 0 (Table 4 ablation) needs ground-truth labels")
        LOG.warning("CONTAMINATION ABLATION (Table 4): GROUND-TRUTH LABELS ARE USED to force %.0f%% of the "
                    "pseudo-normal slots to truly anomalous images", 100 * p.contamination_ratio)
    device = torch.device(device)
    from ..zsad.groups import make_groups

    t0 = time.time()
    groups = make_groups(n, p.group_size, seed=seed if p.group_order == "shuffled" else None)
    trainer = Trainer(feats, coarse, images, backbone, backend, options, seed, textures, device)
    norm = CoarseNorm(p.coarse_norm)
    e = int(eval_resolution)
    maps = {m: np.zeros((n, e, e), np.float32) for m in ("coarse", "ard", "combined")}
    group_of = np.zeros(n, np.int64)
    by_ard = np.zeros(n, bool)  # images whose combined map holds an ARD's output (not a stand-in)
    scales: list[list[float]] = []  # per group: the coarse scale (lo, hi) its maps were combined on
    first_set = holdout = None
    fit_log: list[dict] = []  # per trained group: loss of the final weights in train and eval mode
    guard_log: list[dict] = []  # per refined group: the safeguard's check (PGTConfig.safeguard)
    diagnostics: dict = {}  # per trained group: one pseudo-anomaly and the maps the ARD gives it
    timings = {"train_s": 0.0, "synthesis_s": 0.0, "refine_s": 0.0}

    def unrefined(coarse_n: np.ndarray) -> np.ndarray:
        """Combined map of a group no ARD refines (kept by the safeguard; group 1 under "zeros"): that of an ARD
        saying nothing, calibrated as refined groups' ARDs are, so it keeps the coarse ranking on their scale
        (uncalibrated 0.5·coarse_n; isotonic the group's mean coarse_n in place of the ARD)."""
        return combine(coarse_n, calibrate(coarse_n, np.zeros_like(coarse_n), p.calibration), p.combine)

    def refine_group(k: int, g: np.ndarray, coarse_n: np.ndarray) -> None:
        """Group k's ARD and combined maps from the current ARD, unless the safeguard keeps its coarse map."""
        x, c = trainer.real_inputs(g, norm)
        maps["ard"][g] = trainer.refine(x, c, e)
        # fitted on the group's own real images, whether the group's maps or the safeguard's check set get it
        calibrated = calibration_map(coarse_n, maps["ard"][g], p.calibration)
        use = True
        if p.safeguard:
            normals = select_pseudo_normals(coarse.maps, g, p.n_pseudo_normal)
            verdict = safeguard.check(trainer, holdout, normals, norm, calibrated)
            use = verdict["ap_combined"] > verdict["ap_coarse"] + p.safeguard_margin
            guard_log.append({"group": k + 1, "refined": bool(use), **verdict})
            LOG.info("pgt safeguard: group %d %s (pixel AP on %d held-back pseudo-anomalies + %d pseudo-normal "
                     "images: combined %.4f, coarse %.4f)", k + 1,
                     "refined by the ARD" if use else "KEEPS ITS COARSE MAP: the ARD does not beat it",
                     verdict["n_holdout"], verdict["n_normals"], verdict["ap_combined"], verdict["ap_coarse"])
        if use:
            maps["combined"][g] = combine(coarse_n, calibrated(maps["ard"][g]), p.combine)
        else:
            maps["combined"][g] = unrefined(coarse_n)
        by_ard[g] = use

    for k, g in enumerate(groups):
        group_of[g] = k
        norm.update(coarse.maps[g])
        scales.append([norm.lo, norm.hi])
        # "coarse" is upsampled as the metrics stage upsamples the backend's maps (MuSc's align_corners=True),
        # so its metrics equal the backend's; the coarse half of "combined" as PGTConfig.coarse_align_corners
        maps["coarse"][g] = resize_maps(coarse.maps[g], (e, e), align_corners=True)
        coarse_n = trainer.coarse_at(coarse.maps[g], e, norm)
        t = time.time()
        if trainer.trained:
            refine_group(k, g, coarse_n)
        else:
            # group 1 (nothing trained yet): the coarse map, Sec. 3.2 (or nothing, see first_group_ard)
            maps["ard"][g] = coarse_n if p.first_group_ard == "coarse" else 0.0
            maps["combined"][g] = coarse_n if p.first_group_ard == "coarse" else unrefined(coarse_n)
        timings["refine_s"] += time.time() - t
        refine_self = k == 0 and p.first_group_ard == "self"
        LOG.info("pgt: group %d/%d (%d images) %s", k + 1, len(groups), len(g),
                 "refined by the ARD" if by_ard[g].all() else
                 "waits for the ARD trained on its own pseudo-anomalies" if refine_self else
                 "refined by nothing (coarse map kept)")
        if k == len(groups) - 1 and not p.train_last_group and not refine_self:
            break
        if p.schedule == "one_group" and k > 0:
            continue
        t = time.time()
        if p.schedule == "same_anomalies" and first_set is not None:
            data = first_set
        else:
            if p.schedule == "same_normals" and first_set is not None:
                normals = first_set["normals"]
            else:
                normals = select_pseudo_normals(
                    coarse.maps, g, p.n_pseudo_normal, contamination_ratio=p.contamination_ratio,
                    labels=labels if p.contamination_ratio > 0 else None,
                    gen=make_rng(seed, "contamination", k))
            refs = _references(groups, k, p.query_references, n, backend, normals)
            data = trainer.make_training_set(normals, refs, stream=k)
            if p.safeguard:
                holdout = trainer.make_pseudo_anomalies(normals, refs, p.safeguard_holdout, (k, "safeguard"))
        if first_set is None:
            first_set = data
        timings["synthesis_s"] += time.time() - t
        t = time.time()
        history = trainer.train(data, norm, stream=k)
        if history:
            fit = trainer.check_fit(data, norm)
            fit_log.append({"group": k + 1, **fit})
            diagnostics[f"group{k + 1}"] = trainer.diagnostic(data, norm)
            LOG.info("pgt: group %d trained on %d pseudo-anomalies (normals %s) in %.0f s: %s loss %.4f -> %.4f "
                     "(train mode, during training); final weights on the training set: train mode %.4f, eval mode "
                     "%.4f%s", k + 1, len(data["x"]), [str(feats.ids[int(i)]) for i in data["normals"]],
                     time.time() - t, p.loss, history[0], history[-1], fit["train_mode"], fit["eval_mode"],
                     f" (before BN recalibration {fit['eval_mode_stale_bn']:.4f})" if "eval_mode_stale_bn" in fit
                     else "")
        timings["train_s"] += time.time() - t
        if refine_self and trainer.trained:
            refine_group(k, g, coarse_n)
            LOG.info("pgt: group 1 refined by the ARD trained on its own pseudo-anomalies (first_group_ard='self')")
    scores = {"coarse": np.asarray(coarse.scores, np.float32)}
    for m in ("ard", "combined"):
        scores[m] = image_scores(maps[m], p) if p.image_score != "coarse" else scores["coarse"].copy()
    timings["total_s"] = time.time() - t0
    attrs = {"options": asdict(options), "seed": int(seed), "eval_resolution": e, "timings": timings,
             "n_groups": len(groups), "n_refined_by_ard": int(by_ard.sum()), "loss_history": trainer.loss_history,
             "fit": fit_log, "safeguard": guard_log,
             "coarse_norm": {"mode": p.coarse_norm, "lo": norm.lo, "hi": norm.hi, "groups": scales},
             "image_score_rule": {"coarse": "backend score", "ard": p.image_score, "combined": p.image_score},
             "labels_used": bool(p.contamination_ratio > 0)}
    return Refined(ids=list(feats.ids), maps=maps, scores=scores, groups=group_of, attrs=attrs,
                   diagnostics=diagnostics)


def image_scores(maps: np.ndarray, p: PGTConfig) -> np.ndarray:
    """Image score of each map ``[N,E,E]``: its maximum, or the mean of its top ``image_topk`` pixels."""
    flat = maps.reshape(len(maps), -1)
    if p.image_score == "max":
        return flat.max(1)
    k = max(1, int(round(p.image_topk * flat.shape[1])))
    return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(1)


def _references(groups, k: int, mode: str, n: int, backend=None, sources=()) -> np.ndarray:
    """Reference images of the pseudo-anomalies made from ``sources`` (``PGTConfig.query_references``)."""
    if mode == "backend":
        own = getattr(backend, "reference_indices", None)
        return np.asarray(own(n, sources), dtype=np.int64) if own is not None else groups[k]
    if mode == "group":
        return groups[k]
    if mode == "seen":
        return np.concatenate(groups[: k + 1])
    return np.arange(n)
