"""``run_stream``: AnoRefiner on a stream of images (docs/stream.md), the loop behind ``anorefiner stream``.

Per image, in arrival order (:mod:`.source`): load it (unreadable or another size than the stream's: one
"skipped" line in the results log, naming it and why, and the stream goes on), backbone features, the online
coarse map (:mod:`.scorer`), then the answer (:meth:`Stream.answer`):

* group 1 (the first ``u`` images): the coarse map itself, flagged ``"map": "coarse"``: the paper's rule
  (Sec. 3.2, ``pgt.first_group_ard: coarse``), in the backend's own units, since the coarse scale
  (``pgt.coarse_norm: first_group``) is fixed by group 1 as a whole, which is incomplete while its images are
  answered. The offline run's group 1 ``combined`` (``coarse``) is the same map on that scale, an affine map of it;
* later images: ``combine(coarse_n, calibrated ARD)`` (:mod:`anorefiner.refine.combine`, ``pgt.combine``) with the
  newest ARD in service (``"map": "refined"``, ``ard_group``); ``pgt.calibration`` is fitted on the group the ARD
  was trained on (offline PGT fits it on the group it refines, not arrived yet here). While no ARD is in service
  (its training not finished yet): the map of an ARD saying nothing, the coarse map on the refined maps' scale
  (``"map": "coarse_scaled"``, offline PGT's rule for a group no ARD refines, calibrated per image).

Outputs and the log: :mod:`.results`. When group k is complete the ARD service (:mod:`.service`) trains on it in
the background. Restart (same ``OUT``): scored images are read back from the log, the features the next images
and the untrained groups need are recomputed from their files, the ARD is restored from ``state/ard.pt`` and
groups completed after it are trained again; ``state/run.json`` must match the run's settings.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..io import write_json_atomic
from ..log import LOG
from ..metrics.evaluate import resize_maps
from ..refine.combine import calibrate, combine
from ..refine.pgt import image_scores
from ..refine.trainer import CoarseNorm, Trainer
from .config import StreamConfig, check_pgt_online
from .results import ResultsLog, output_stem, read_maps, write_maps, write_overlay
from .rows import StreamCoarse, StreamFeatures
from .scorer import MuscWindowScorer, online_scorer
from .service import ARDService
from .source import read_list, watch_folder


def run_stream(inputs, out, *, backbone, backend_name: str, backend, options, config: StreamConfig | None = None,
               seed: int = 0, textures=(), device="cpu", category: str = "") -> dict:
    """Run the stream until its input ends (a list), ``idle_timeout_s`` or ``max_images`` (module doc).

    ``inputs``: a folder to watch, or an iterable of image paths (e.g. ``sys.stdin``). ``backend``: built by
    :func:`anorefiner.zsad.get_backend` from ``backend_name``. ``options``:
    :class:`~anorefiner.refine.pgt.RefinerOptions`.
    Returns a summary (images scored and skipped in this run, groups trained).
    """
    stream = Stream(out, backbone=backbone, backend_name=backend_name, backend=backend, options=options,
                    config=config or StreamConfig(), seed=seed, textures=textures, device=device, category=category)
    try:
        summary = stream.run(inputs)
    except BaseException:
        stream.close(wait=False)  # an error or Ctrl-C: do not wait for queued training (restart redoes it)
        raise
    stream.close()
    return summary


class Stream:
    """The state of one stream (module doc); :func:`run_stream` is its entry point."""

    def __init__(self, out, *, backbone, backend_name, backend, options, config, seed, textures, device, category):
        options.validate()
        config.validate()
        check_pgt_online(options)
        if options.pgt.first_group_ard != "coarse":
            LOG.info("stream: group 1 is answered with its coarse maps (the paper's rule); pgt.first_group_ard=%r "
                     "is not used", options.pgt.first_group_ard)
            options.pgt.first_group_ard = "coarse"
        self.out, self.state_dir = Path(out), Path(out) / "state"
        self.backbone, self.options, self.config = backbone, options, config
        self.seed, self.textures, self.device = int(seed), textures, torch.device(device)
        self.p = options.pgt
        self.u = int(self.p.group_size)
        self.scorer = online_scorer(backend_name, backend, window=config.window, min_references=config.min_references)
        if config.refine and not self.scorer.refinable:
            raise ValueError(f"backend {backend_name!r} scores images, so PGT cannot refine it (no pseudo-anomaly "
                             "maps from cached features); run it with refine: false (--no-refine) for coarse maps")
        self._threads()
        self._check_settings(backend_name, backend, category)
        self.log = ResultsLog(self.out / "results.jsonl")
        self.feats: StreamFeatures | None = None
        self.coarse = StreamCoarse()
        self.norm = CoarseNorm(self.p.coarse_norm)
        self.paths: list[str] = []
        self.pending: dict[int, tuple[str, float, np.ndarray]] = {}  # accepted, not yet scored: path, t, image
        self.size = tuple(config.image_size) if config.image_size else None
        self.n_accepted = self.n_scored = 0
        self.service: ARDService | None = None
        self.summary = {"scored": 0, "skipped": 0, "groups_trained": 0}  # in this run
        self._restore()

    # ------------------------------------------------------------------ setup
    def _threads(self) -> None:
        total = torch.get_num_threads()
        c = self.config
        self.train_threads = int(c.train_threads or max(1, total // 2))
        torch.set_num_threads(int(c.score_threads or max(1, total - self.train_threads)))

    def _check_settings(self, backend_name, backend, category) -> None:
        from ..stages import canonical, first_difference

        c = self.config
        settings = canonical({
            "category": category, "backend": backend_name, "backend_options": asdict(backend.config)
            if hasattr(backend, "config") else {}, "backbone": self.backbone.identity, "refiner": asdict(self.options),
            "seed": self.seed, "stream": {k: getattr(c, k) for k in ("window", "min_references", "refine",
                                                                      "eval_resolution", "image_size")}})
        path = self.state_dir / "run.json"
        if path.exists():
            why = first_difference(json.loads(path.read_text()), settings)
            if why:
                raise ValueError(f"{self.out} holds a stream run with other settings ({why}); use another output "
                                 "folder or the same settings")
        else:
            write_json_atomic(path, settings)

    def _restore(self) -> None:
        """Continue the stream in ``OUT`` (module doc)."""
        for folder in ("maps", "overlays", "state"):
            for tmp in (self.out / folder).glob(".*.tmp"):  # left by a write the kill interrupted
                tmp.unlink(missing_ok=True)
        scored = self.log.scored
        if [e["index"] for e in scored] != list(range(len(scored))):
            raise ValueError(f"results log {self.log.path}: scored images are not numbered 0..{len(scored) - 1}")
        n = self.n_accepted = self.n_scored = len(scored)
        if not n:
            return
        self.paths = [e["path"] for e in scored]
        self.size = self.size or tuple(scored[0]["image_size"])
        checkpoint = self.state_dir / "ard.pt"
        trained = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["group"]) \
            if checkpoint.exists() else -1
        keep_from = min(self._keep_from(trained), n - 1)  # at least one row: the ARD's input shape
        LOG.info("stream: continuing after %d scored images (ARD trained through group %d); recomputing the "
                 "features of images %d..%d", n, trained + 1, keep_from, n - 1)
        for j in range(keep_from, n):
            from ..data.index import load_image

            if not Path(self.paths[j]).is_file():
                raise FileNotFoundError(f"stream restart: image {j} ({self.paths[j]}) is gone, but its features are "
                                        "needed again (MuSc window or an untrained group)")
            self._add_features(j, self.paths[j], load_image(self.paths[j]))
            maps = read_maps(self.out / scored[j]["maps"])
            self.coarse.add(j, maps["coarse_patch"], scored[j]["coarse_score"])
        if self.config.refine and n >= self.u:
            self.norm.update(np.stack([read_maps(self.out / e["maps"])["coarse_patch"] for e in scored[: self.u]]))
            self._start_service()
            self.service.restore()
            for k in range(self.service.trained_through + 1, n // self.u):
                self.service.submit(k, time.time())

    def _keep_from(self, trained: int) -> int:
        """Oldest image whose rows are still needed: by the next image's coarse map, the untrained groups and the
        last trained one (its calibration is fitted again on a restart)."""
        oldest = self.n_scored if not self.config.refine else min(self.n_scored, self.u * max(trained, 0))
        return self.scorer.oldest_needed(oldest)

    def _start_service(self) -> None:
        trainer = Trainer(self.feats, self.coarse, self.paths, self.backbone, self.scorer, self.options, self.seed,
                          self.textures, self.device)
        self.service = ARDService(trainer, self.scorer, self.norm, self.options, self.state_dir, self.train_threads,
                                  self.config.eval_resolution)

    # ------------------------------------------------------------------ loop
    def run(self, inputs) -> dict:
        c = self.config
        done = self.log.done_paths()
        if isinstance(inputs, (str, Path)):
            source = watch_folder(inputs, extensions=c.extensions, poll_s=c.poll_s, idle_timeout_s=c.idle_timeout_s,
                                  done=done)
        else:
            source = read_list(inputs, done=done)
        ended = not self._enough() and self._consume(source)
        if ended:  # the input ended: score what waits for more images, if it can be
            for j in self.scorer.ready(self.n_accepted, self.n_scored, final=True):
                self.answer(j)
        if self.pending:
            LOG.warning("stream: %d image(s) wait for more images to be scored against (%s); they are scored when "
                        "the stream continues", len(self.pending), [p for p, _, _ in self.pending.values()])
        if self.service is not None:
            self.service.drain()
            self.summary["groups_trained"] = self.service.n_trained
        return self.summary

    def _consume(self, source) -> bool:
        """Take images until the source ends (True) or ``max_images`` are scored (False)."""
        for path, t_arrival in source:
            self.accept(path, t_arrival)
            if self._enough():
                return False
        return True

    def _enough(self) -> bool:
        return self.config.max_images is not None and self.n_scored >= self.config.max_images

    def accept(self, path: str, t_arrival: float) -> None:
        """Load, check and featurise one arriving image; score whatever the scorer can score now."""
        from ..data.index import load_image

        try:
            image = load_image(path)
        except Exception as err:  # any unreadable file: logged with its name, the stream goes on
            return self._skip(path, t_arrival, f"unreadable: {err}")
        if self.size is None:
            self.size = tuple(image.shape[:2])
        if tuple(image.shape[:2]) != self.size:
            return self._skip(path, t_arrival, f"size {image.shape[0]}x{image.shape[1]}, the stream's images are "
                                               f"{self.size[0]}x{self.size[1]}")
        i = self.n_accepted
        self.paths.append(path)
        self._add_features(i, path, image)
        self.pending[i] = (path, t_arrival, image)
        self.n_accepted += 1
        for j in self.scorer.ready(self.n_accepted, self.n_scored):
            self.answer(j)

    def _add_features(self, i: int, path: str, image: np.ndarray) -> None:
        with torch.no_grad():
            layers, cls = self.backbone.forward(self.backbone.preprocess([image]))
        if self.feats is None:
            self.feats = StreamFeatures(list(layers), cls is not None)
        self.feats.add(i, Path(path).name, {k: v[0].float().cpu().numpy() for k, v in layers.items()},
                       None if cls is None else cls[0].float().cpu().numpy())

    def _skip(self, path: str, t_arrival: float, reason: str) -> None:
        LOG.warning("stream: skipped %s: %s", path, reason)
        self.log.append({"status": "skipped", "path": path, "name": Path(path).name, "reason": reason,
                         "t_arrival": t_arrival, "t_done": time.time()})
        self.summary["skipped"] += 1

    def answer(self, j: int) -> dict:
        """Score image ``j``, write its maps and overlay, append its log line (module doc)."""
        path, t_arrival, image = self.pending.pop(j)
        k, e, p = j // self.u, int(self.config.eval_resolution), self.p
        served = None
        if self.service is not None:
            served = self.service.wait_for(k - 1) if self.config.wait_for_ard and k >= 1 else self.service.current()
        kwargs = {"n_accepted": self.n_accepted} if isinstance(self.scorer, MuscWindowScorer) else {}
        patch, coarse_score = self.scorer.score(self.feats, j, image=image, **kwargs)
        self.coarse.add(j, patch, coarse_score)
        maps = {"coarse_patch": patch, "coarse": resize_maps(patch[None], (e, e), align_corners=True)[0]}
        if k == 0 or not self.config.refine:
            kind, final, score = "coarse", maps["coarse"], coarse_score
        else:
            coarse_n = self.service.trainer.coarse_at(patch[None], e, self.norm)[0]
            if served is not None:
                x, c = served.refiner.real_inputs(np.asarray([j]), self.norm)
                maps["ard"] = served.refiner.refine(x, c, e)[0]
                kind, final = "refined", combine(coarse_n, served.calibration(maps["ard"]), p.combine)
            else:  # an ARD saying nothing, calibrated as offline PGT does for a group no ARD refines (per image)
                nothing = calibrate(coarse_n, np.zeros_like(coarse_n), p.calibration)
                kind, final = "coarse_scaled", combine(coarse_n, nothing, p.combine)
            score = coarse_score if p.image_score == "coarse" else float(image_scores(final[None], p)[0])
        maps["final"] = final
        stem = output_stem(j, path)
        write_maps(self.out / "maps" / f"{stem}.npz", maps)
        entry = {"status": "ok", "index": j, "path": path, "name": Path(path).name, "group": k + 1, "map": kind,
                 "ard_group": served.group + 1 if kind == "refined" else None, "score": float(score),
                 "coarse_score": float(coarse_score), "maps": f"maps/{stem}.npz", "image_size": list(self.size),
                 "t_arrival": t_arrival}
        if isinstance(self.scorer, MuscWindowScorer):
            entry["references"] = [int(r) for r in self.scorer.references(j, self.n_accepted)[[0, -1]]]
        if self.config.overlay:
            scale = (0.0, 1.0) if kind != "coarse" else (float(final.min()), float(final.max()))
            write_overlay(self.out / "overlays" / f"{stem}.png", image, final, scale)
            entry["overlay"] = f"overlays/{stem}.png"
        entry["t_done"] = time.time()
        entry["latency_s"] = round(entry["t_done"] - t_arrival, 4)
        self.log.append(entry)
        self.n_scored += 1
        self.summary["scored"] += 1
        if self.config.refine and (j + 1) % self.u == 0:
            self._group_complete(k, entry["t_done"])
        trained = self.service.trained_through if self.service is not None else -1
        keep_from = self._keep_from(trained)
        self.feats.drop_before(keep_from)
        self.coarse.drop_before(keep_from)
        return entry

    def _group_complete(self, k: int, t_done: float) -> None:
        if k == 0:
            self.norm.update(self.coarse.maps[np.arange(self.u)])
            self._start_service()
        self.service.submit(k, t_done)

    def close(self, wait: bool = True) -> None:
        if self.service is not None:
            self.service.close(wait)
