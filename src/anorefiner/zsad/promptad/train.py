"""Training of PromptAD's prompts on the k normal shots of a category (rule ``train_fewshot``).

Recipe (``FuNz-0/PromptAD@0f86ce0`` ``train_cls.py`` / ``train_seg.py``, the defaults of :class:`TrainConfig`):
two prompt learners, ``cls`` with ``n_pro = 3`` and ``seg`` with ``n_pro = 1`` (``--n_pro``; ``n_ctx 4``,
``n_ctx_ab 1``, ``n_pro_ab 4``), each trained alone: SGD lr 0.002, momentum 0.9, weight decay 5e-4, cosine
annealing to 1e-5 over 100 epochs, one step per epoch on all k shots (batch 400 > k); loss
:func:`.prompts.prompt_loss` with ``lambda1 = 0.001`` on the class embeddings (``cls``) or the v-v patch tokens
(``seg``) of the shots (RGB; frozen CLIP, so they are encoded once, with the backend's default forward options);
seed 111 (``setup_seed``).

Not reproduced: the official code scores the *test set* after every epoch and keeps the epoch with the best image
(``cls``) or pixel (``seg``) AUROC; here the last epoch is kept, as for every trained backend (docs/backends.md).
The shots are drawn by the run's seed (:class:`..shots.TrainGood`), not read from ``seeds_mvtec``'s lists.

Checkpoint: ``{"promptad": {"<task>.normal_ctx", "<task>.abnormal_ctx"}, "meta": {..., "shots": [ids]}}``,
loaded weights-only; the coarse stage rebuilds the gallery from the recorded shots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...log import LOG
from ..checkpoints import check_finite_loss, load_weights_only, save_checkpoint, training_info
from .forward import PRE_RESIZE, SURGERY_BLOCKS, preprocess, vv_forward
from .prompts import PromptLearner, prompt_loss

KEY = "promptad"
TASKS = ("cls", "seg")


@dataclass
class TrainConfig:
    """PromptAD prompt training (config ``backends.<name>.train.<dataset>``)."""

    epochs: int = 100  # train_*.py --Epoch
    lr: float = 0.002  # --lr
    momentum: float = 0.9  # --momentum
    weight_decay: float = 0.0005  # --weight_decay
    eta_min: float = 1e-5  # CosineAnnealingLR(T_max=Epoch, eta_min=1e-5)
    lambda1: float = 0.001  # --lambda1: weight of the match loss
    margin: float = 0.0  # TripletLoss(margin=0.0)
    seed: int = 111  # setup_seed(111): the contexts' initialisation (the run seed draws the shots)
    n_ctx: int = 4  # --n_ctx
    n_ctx_ab: int = 1  # --n_ctx_ab
    n_pro_ab: int = 4  # --n_pro_ab
    n_pro_cls: int = 3  # train_cls.py --n_pro
    n_pro_seg: int = 1  # train_seg.py --n_pro


def learners(backbone, category: str, config: TrainConfig) -> dict[str, PromptLearner]:
    """The ``cls`` and ``seg`` prompt learners at their seeded initialisation, on the backbone's device."""
    from .prompts import CLASS_STATES

    if category not in CLASS_STATES:
        LOG.warning("promptad: no class-specific abnormal states for %r (ad_prompts.py lists MVTec AD and VisA): "
                    "only the 8 generic ones", category)
    c = config
    return {task: PromptLearner(backbone, category, n, c.n_ctx, c.n_pro_ab, c.n_ctx_ab, c.seed).to(backbone.device)
            for task, n in (("cls", c.n_pro_cls), ("seg", c.n_pro_seg))}


def train_learner(learner: PromptLearner, image_feats: torch.Tensor, scale: float, config: TrainConfig) -> list[float]:
    """The official loop on fixed (frozen-CLIP) image features: one SGD step per epoch, cosine schedule."""
    c = config
    opt = torch.optim.SGD(learner.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.epochs, eta_min=c.eta_min)
    losses = []
    for epoch in range(1, c.epochs + 1):
        opt.zero_grad(set_to_none=True)
        loss = prompt_loss(image_feats, learner.encode(), scale, c.lambda1, c.margin)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        check_finite_loss("promptad", epoch, losses[-1])
    return losses


def train_fewshot(backbone, root, dataset: str, category: str, config: TrainConfig, out, *, k_shot: int, seed: int,
                  categories=None, text_cache=None) -> Path:
    """Trainer interface (few-shot): train both learners on the k shots drawn by ``seed``; write the checkpoint."""
    from ..shots import TrainGood

    if config.epochs < 1:
        raise ValueError(f"promptad training: epochs must be >= 1, got {config.epochs}")
    source = TrainGood(root, dataset, category)
    shots = source.draw(k_shot, seed, "promptad")
    x = preprocess(backbone, source.load(shots), PRE_RESIZE, bgr=False).to(backbone.device)
    feats = vv_forward(backbone, x, SURGERY_BLOCKS, gallery_blocks=())  # the backend's default forward, no gallery
    scale = float(backbone.model.logit_scale.detach())
    start = time.time()
    state, losses = {}, {}
    for task, learner in learners(backbone, category, config).items():
        losses[task] = train_learner(learner, feats["cls"] if task == "cls" else feats["tokens"], scale, config)
        state.update({f"{task}.{k}": v.detach().cpu().clone() for k, v in learner.state_dict().items()})
        LOG.info("promptad %s prompts: loss %.4f -> %.4f over %d epochs", task, losses[task][0], losses[task][-1],
                 config.epochs)
    rows = [{"category": category, "image": i} for i in shots]
    meta = {"dataset": dataset, "category": category, "k_shot": int(k_shot), "shots_seed": int(seed),
            "shots": shots, "class_name": category, "losses": losses}
    save_checkpoint(out, {KEY: state}, training_info(config, losses["seg"], rows, backbone, start, meta))
    LOG.info("promptad prompts of %s/%s (%d shots, seed %d) -> %s", dataset, category, k_shot, seed, out)
    return Path(out)


def load_prompts(path, backbone, category: str, k_shot: int | None = None):
    """``({task: PromptLearner}, meta)`` of a checkpoint; keys, shapes, the category and k are checked."""
    import json

    obj = load_weights_only(path, "promptad checkpoint")
    state, meta = (obj.get(KEY), obj.get("meta")) if isinstance(obj, dict) else (None, None)
    if not isinstance(state, dict) or not isinstance(meta, dict) or "shots" not in meta:
        raise ValueError(f"promptad checkpoint {path}: no {KEY!r} state with a 'meta' holding the shots")
    config = TrainConfig(**{k: v for k, v in json.loads(meta["train_config"]).items()
                            if k in TrainConfig.__dataclass_fields__})
    meta = dict(meta, shots=json.loads(meta["shots"]) if isinstance(meta["shots"], str) else list(meta["shots"]))
    if meta.get("category") != category:
        raise ValueError(f"promptad checkpoint {path} was trained on category {meta.get('category')!r}, not "
                         f"{category!r}")
    if k_shot is not None and int(meta.get("k_shot", -1)) != int(k_shot):
        raise ValueError(f"promptad checkpoint {path} holds {meta.get('k_shot')} shots, the backend wants {k_shot}")
    out = learners(backbone, category, config)
    for task, learner in out.items():
        own = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{task}.")}
        expected = {k: tuple(v.shape) for k, v in learner.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in own.items()}
        if got != expected:
            raise ValueError(f"promptad checkpoint {path}: {task} prompts {got} do not fit the backbone {expected}")
        learner.load_state_dict(own)
    return out, meta


def check_checkpoint(path, backbone=None) -> None:
    """Trainer interface: the file loads weights-only with the prompts and shots of one category."""
    obj = load_weights_only(path, "promptad checkpoint")
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or not isinstance(obj.get(KEY), dict) or not meta.get("shots"):
        raise ValueError(f"promptad checkpoint {path}: no {KEY!r} prompts with their shots")
    if backbone is not None:
        load_prompts(path, backbone, meta["category"])

