"""PGT on a stream: the ARD trained group by group in a background thread, the newest one swapped in for scoring.

When group k (images ``k·u .. k·u+u-1`` in arrival order) is complete, :meth:`ARDService.submit` queues it; the
training thread runs PGT's group step with PGT's own pieces (AnoRefiner Sec. 3.2, Fig. 6: pseudo-normal
selection :func:`~anorefiner.refine.pgt.select_pseudo_normals`, pseudo-anomalies and their coarse maps
:meth:`~anorefiner.refine.trainer.Trainer.make_training_set`, Eq. 4 training and BatchNorm recalibration
:meth:`~.Trainer.train` / :meth:`~.Trainer.check_fit`) on the one progressively trained ARD, then puts a copy of
it in service (one reference assignment: the scorer picks it up at its next image, never half-updated) and
checkpoints it (``state/ard.pt``, atomic, loaded with ``weights_only=True``) with its optimiser state, so a
restart resumes the training exactly after the last finished group.

Thread, not process: the training reads the scorer's recent features (the MuSc window) and runs the same
backbone and backend for its pseudo-anomalies; a thread shares them without copies or a second model in memory,
and torch releases the GIL inside its kernels, so both run at once. Each thread sets its own torch CPU thread
count (``StreamConfig.score_threads`` / ``train_threads``) so that together they do not oversubscribe the cores.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..io import atomic_path
from ..log import LOG
from ..refine.combine import calibration_map
from ..refine.pgt import _references, select_pseudo_normals


@dataclass
class ServedARD:
    """An ARD in service: a frozen copy of the trainer's model after group ``group`` (0-based), and the
    calibration (``pgt.calibration``) fitted on that group's real images."""

    group: int
    refiner: object  # a shallow copy of the Trainer holding the frozen model: .real_inputs, .refine
    calibration: Callable  # ARD maps -> calibrated ARD maps (identity for calibration "none")
    t_in_service: float


class ARDService:
    """The training thread (module doc). ``trainer``: a :class:`~anorefiner.refine.trainer.Trainer` over the
    stream's rows; ``scorer``: the online scorer (PGT's ``backend``); ``norm``: the frozen coarse scale."""

    def __init__(self, trainer, scorer, norm, options, state_dir: str | Path, threads: int, eval_resolution: int):
        self.trainer, self.scorer, self.norm, self.options = trainer, scorer, norm, options
        self.eval_resolution = int(eval_resolution)
        self.u = int(options.pgt.group_size)
        self.state_dir = Path(state_dir)
        self.checkpoint = self.state_dir / "ard.pt"
        self.groups_log = self.state_dir.parent / "groups.jsonl"
        self.threads = int(threads)
        self.trained_through = -1  # last group whose ARD is in service
        self.n_trained = 0  # groups trained by this process
        self.served: ServedARD | None = None
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._loop, name="ard-training", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ scorer side
    def restore(self) -> int:
        """Load ``state/ard.pt`` (if any) into the trainer and put it in service; returns its group (-1: none)."""
        if not self.checkpoint.exists():
            return -1
        state = torch.load(self.checkpoint, map_location=self.trainer.device, weights_only=True)
        if int(state["group_size"]) != self.u:
            raise ValueError(f"{self.checkpoint}: trained with group_size {state['group_size']}, not {self.u}")
        self.trainer.model.load_state_dict(state["model"])
        self.trainer.opt.load_state_dict(state["optimizer"])
        self.trainer.loss_history = [list(h) for h in state["loss_history"]]
        self.trainer.trained = bool(state["trained"])
        self._publish(int(state["group"]))
        LOG.info("stream: ARD trained through group %d restored from %s", self.trained_through + 1, self.checkpoint)
        return self.trained_through

    def submit(self, group: int, t_complete: float) -> None:
        with self._cond:
            self._pending += 1
            waiting = self._pending
        if waiting > 1:
            LOG.warning("stream: %d groups wait for training (training is slower than the line): the ARD in service "
                        "falls behind", waiting)
        self._queue.put((int(group), float(t_complete)))

    def current(self) -> ServedARD | None:
        self.check()
        return self.served

    def wait_for(self, group: int) -> ServedARD | None:
        """Block until the ARD trained on ``group`` is in service (``StreamConfig.wait_for_ard``)."""
        with self._cond:
            while self.trained_through < group and self.error is None:
                self._cond.wait()
        self.check()
        return self.served

    def drain(self) -> None:
        """Wait until every submitted group is trained."""
        with self._cond:
            while self._pending and self.error is None:
                self._cond.wait()
        self.check()

    def close(self, wait: bool = True) -> None:
        """Stop the thread after the queued groups (``wait``); else leave it (a daemon) to die with the process."""
        self._queue.put(None)
        if wait:
            self._thread.join()

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"stream: ARD training failed: {self.error}") from self.error

    # ------------------------------------------------------------------ training thread
    def _loop(self) -> None:
        torch.set_num_threads(self.threads)  # per thread: the scorer's count is set in its own thread
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._train(*item)
            except BaseException as err:  # handed to the scorer, which stops the stream naming it
                LOG.exception("stream: training group %d failed", item[0] + 1)
                with self._cond:
                    self.error = err
                    self._cond.notify_all()
                return
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def _train(self, k: int, t_complete: float) -> None:
        """PGT's group step (Sec. 3.2) on group ``k``, as :func:`anorefiner.refine.pgt.run_pgt` runs it."""
        p, t0 = self.options.pgt, time.time()
        groups = [np.arange(j * self.u, (j + 1) * self.u) for j in range(k + 1)]
        normals = select_pseudo_normals(self.trainer.coarse.maps, groups[k], p.n_pseudo_normal)
        refs = _references(groups, k, p.query_references, (k + 1) * self.u, self.scorer, normals)
        data = self.trainer.make_training_set(normals, refs, stream=k)
        t1 = time.time()
        history = self.trainer.train(data, self.norm, stream=k)
        t2 = time.time()
        fit = self.trainer.check_fit(data, self.norm) if history else {}
        self._publish(k)
        self.n_trained += 1
        t_served = self.served.t_in_service
        self._save(k)
        record = {"group": k + 1, "images": [int(groups[k][0]), int(groups[k][-1])],
                  "normals": [int(i) for i in normals], "loss_first": history[0] if history else None,
                  "loss_last": history[-1] if history else None, "fit": fit, "train_s": round(t_served - t0, 3),
                  "pseudo_anomalies_s": round(t1 - t0, 3), "epochs_s": round(t2 - t1, 3),
                  "complete_to_service_s": round(t_served - t_complete, 3)}
        with open(self.groups_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        LOG.info("stream: ARD of group %d in service %.1f s after its last image (training %.1f s, loss %s)",
                 k + 1, t_served - t_complete, t_served - t0,
                 f"{history[0]:.4f} -> {history[-1]:.4f}" if history else "-")

    def _publish(self, k: int) -> None:
        refiner = copy.copy(self.trainer)
        refiner.model = copy.deepcopy(self.trainer.model).eval()
        calibration = self._calibration(refiner, k)
        with self._cond:
            self.served = ServedARD(group=k, refiner=refiner, calibration=calibration, t_in_service=time.time())
            self.trained_through = k
            self._cond.notify_all()

    def _calibration(self, refiner, k: int) -> Callable:
        """``pgt.calibration`` fitted on group k's real images with the ARD trained on them. Offline PGT fits it on
        the group it refines, whose images have not arrived here yet: the stream applies the fit of the ARD's own
        group to the next images (docs/stream.md)."""
        mode = self.options.pgt.calibration
        if mode == "none":
            return calibration_map(None, None, mode)
        g, e = np.arange(k * self.u, (k + 1) * self.u), self.eval_resolution
        x, c = refiner.real_inputs(g, self.norm)
        return calibration_map(refiner.coarse_at(self.trainer.coarse.maps[g], e, self.norm), refiner.refine(x, c, e),
                               mode)

    def _save(self, k: int) -> None:
        state = {"group": k, "group_size": self.u, "model": self.trainer.model.state_dict(),
                 "optimizer": self.trainer.opt.state_dict(), "loss_history": self.trainer.loss_history,
                 "trained": bool(self.trainer.trained)}
        with atomic_path(self.checkpoint, suffix=".pt") as tmp:
            torch.save(state, tmp)
