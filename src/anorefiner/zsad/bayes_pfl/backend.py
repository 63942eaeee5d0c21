"""Bayes-PFL (CVPR 2025): Bayesian prompt flow learning, zero-shot maps and scores from the feature cache.

Facts from ``xiaozhen228/Bayes-PFL@8f155a0`` (``test.py``, ``test.sh``, ``models/VPB.py``,
``models/metric_and_visualization.py``; the model in :mod:`.model`, the text in :mod:`.prompts`):

* features: CLIP's plain forward (ViT-L-14-336 at 518, GELU, bicubic-antialiased position embedding:
  ``models/model_CLIP.py``, ``models/transformer.py``): the un-normalised ``ln_post(CLS) @ proj`` and the *raw*
  patch tokens of blocks 6/12/18/24 (no ``ln_post``), exactly the feature cache of ``vit_l14_336``;
* Monte-Carlo text: R = 10 samples (``test.sh --sample_num 10``) of the image-specific flow per image, and R samples
  of each image-agnostic flow drawn *once* for the whole test run (``forward_ensemble`` caches ``zk_n`` / ``zk_a`` at
  the first image); per sample r and bank prompt b a (normal, abnormal) text pair;
* image probability (stage 2, the released models' stage): ``mean over the 3R pairs of softmax(exp(tau_img)
  <L2(class_mapping(t)), L2(image_mapping(g + fuse(tokens)))>)[abnormal]`` (``test.py`` l.150-156);
* map: per layer and pair ``softmax`` of the bilinearly upsampled (align_corners=True) pixel logits, abnormal
  channel, mean over the 4 x 3R maps (``test.py`` l.158-164); ``gaussian_filter(sigma=8)`` (scipy defaults) for the
  pixel metrics (``calcuate_metric_pixel``);
* image score (``calcuate_metric_pixel`` l.161-189): ``0.5 minmax_class(prob) + 0.5 minmax_class(mean of the top-k
  pixels of the unsmoothed map)``, k = 20 for capsules, macaroni1/2, pipe_fryum, screw, cashew, chewinggum, else
  2000 (pixels of a 518 x 518 map; scaled for smaller maps), min-max over the class with ``+ 1e-8``.

Randomness: the flow samples come from the run's seed (state samples: one stream per run; image samples: one stream
per image, so a map does not depend on the batching). Store choice (as :mod:`..vcp_clip`): token-grid maps, the
area mean per patch of the smoothed full-size map; the image score depends on the other images of the category
(option ``class_minmax``). PGT can refine the maps (:meth:`BayesPflBackend.score_queries`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...log import LOG
from ..april_gan.backend import patch_map
from ..maps import float_tensor, gaussian_smooth
from ..vcp_clip.backend import effective_topk
from .model import BayesPfl, planar_flows, sample
from .prompts import class_tokens, text_embeddings

CHECKPOINT_KEY = "MyModel"  # train.py: torch.save({'MyModel': MyModel.state_dict()})
MAP_LEVEL = ("token grid: area mean per patch of the official full-size map (gaussian(sigma 8) of the mean over "
             "layers and prompt pairs of the upsampled softmax)")
#: calcuate_metric_pixel: classes whose image score averages the top 20 pixels (2000 otherwise)
SMALL_TOPK_CLASSES = ("capsules", "macaroni1", "macaroni2", "pipe_fryum", "screw", "cashew", "chewinggum")


@dataclass
class BayesPflConfig:
    """Options of the ``bayes_pfl`` backend (config ``backends.<name>.options``)."""

    checkpoint: str = ""  # trained model (rule train_backend)
    class_name: str = ""  # the category; the coarse stage passes it verbatim (class_mapping keys)
    sample_num: int = 10  # test.sh --sample_num (R)
    stage: int | None = None  # None: the checkpoint's last training stage (official files: 2, test.py)
    sigma: float = 8.0  # calcuate_metric_pixel sigm=8 (pixels of the 518 map)
    truncate: float = 4.0  # scipy default
    alpha: float = 0.5  # calcuate_metric_pixel alpha: weight of the text probability in the image score
    topk: int = 2000  # can_k of the other classes
    topk_small: int = 20  # can_k of SMALL_TOPK_CLASSES
    topk_small_classes: tuple = SMALL_TOPK_CLASSES
    topk_reference: int = 518  # map side the official k is meant for; fewer pixels scale k (>= 1)
    class_minmax: bool = True  # the per-class min-max of both score parts (official)
    map_size: int | None = None  # None = the backbone's input size (518)
    batch_size: int = 4  # images per computation (memory of the [B, 3R, S, S] maps; results do not depend on it)
    device: str = "auto"  # used only when the backbone has no device


def _dims(state: dict, path: Path) -> dict:
    try:
        bank, u = state["prompt_context"], state["PFL_normal.amor_u"]
        proj = state["RCA.linear_proj.0.weight"]
        n_layers = 0
        while f"RCA.linear_proj.{n_layers}.weight" in state:
            n_layers += 1
        return {"width": int(proj.shape[1]), "text_width": int(bank.shape[2]), "embed": int(u.shape[2]),
                "n_layers": n_layers, "prompt_num": int(bank.shape[0]), "context_len": int(bank.shape[1]),
                "state_len": int(state["prompt_state_normal"].shape[1]), "num_flows": int(u.shape[1])}
    except (KeyError, AttributeError, IndexError) as err:
        raise ValueError(f"bayes_pfl checkpoint {path}: missing or malformed entry {err}") from None


def load_model(path: str | Path, backbone=None, rca_heads: int = 4) -> tuple[BayesPfl, dict]:
    """``(model, meta)`` of a checkpoint: sizes read from its shapes, widths checked against the backbone, every
    key and shape compared with the model's (errors name the file and the key)."""
    from ..aa_clip.model import dims_of
    from ..checkpoints import check_state, load_weights_only

    path = Path(path)
    obj = load_weights_only(path, "bayes_pfl checkpoint")
    state = obj.get(CHECKPOINT_KEY) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"bayes_pfl checkpoint {path}: no {CHECKPOINT_KEY!r} state dict (top-level keys: {keys})")
    dims = _dims(state, path)
    if backbone is not None:
        width, text_width, embed = dims_of(backbone)
        got = (dims["width"], dims["text_width"], dims["embed"], dims["n_layers"])
        want = (width, text_width, embed, len(backbone.layers))
        if got != want:
            raise ValueError(f"bayes_pfl checkpoint {path}: (vision width, text width, embed, layers) = {got}, the "
                             f"backbone has {want}")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the global RNG
        model = BayesPfl(**dims, rca_heads=int(meta.get("rca_heads", rca_heads)))
    check_state(path, "bayes_pfl checkpoint", model.state_dict(), state)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval().requires_grad_(False), meta


def flow_samples(flow, eps: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
    """``PlanarPFL(_state).forward`` in test mode: ``eps [R, D]`` -> ``z_K [R, D]`` for one image (``image [D]``) or
    for the learned state (``image`` None)."""
    mu, var, u, w, b = flow.params() if image is None else flow.params(image[None])
    r = eps.shape[0]
    z, _ = planar_flows(sample(mu, var, eps), u.expand(r, *u.shape[1:]), w.expand(r, *w.shape[1:]),
                        b.expand(r, *b.shape[1:]))
    return z


def monte_carlo_text(model: BayesPfl, backbone, tokens: torch.Tensor, image: torch.Tensor, eps: torch.Tensor,
                     state_z: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``forward_ensemble`` + ``TextEncoder`` in test mode for ``b`` images: global features ``image [b, D]``, their
    flow noise ``eps [b, R, D]``, the run's state samples ``(normal, abnormal)`` ``[R, D]`` each and the class
    tokens ``[1, L]`` -> L2-normalised text ``[b, 2 R B, D]``: the normal block first, each block ordered
    (sample, bank prompt) as the official ``x_new_array``."""
    b, r = eps.shape[:2]
    rows = torch.cat([flow_samples(model.PFL_context, eps[i], image[i]) for i in range(b)])  # [b * R, D], by image
    text = text_embeddings(model, backbone, tokens.expand(b * r, -1), rows, state_z[0].repeat(b, 1),
                           state_z[1].repeat(b, 1))
    s = text.shape[1] // 2
    return torch.cat([text[:, :s].reshape(b, r * s, -1), text[:, s:].reshape(b, r * s, -1)], dim=1)


def pair_probs(logits: torch.Tensor) -> torch.Tensor:
    """``[..., 2S]`` logits (normal prompts, then abnormal) -> ``[..., S]`` softmax of each pair, abnormal channel."""
    s = logits.shape[-1] // 2
    return torch.sigmoid(logits[..., s:] - logits[..., :s])


def full_map(model: BayesPfl, text: torch.Tensor, tokens: list[torch.Tensor], grid: tuple[int, int], size: int
             ) -> torch.Tensor:
    """``[B, S, S]``: mean over layers and prompt pairs of the abnormal softmax of the upsampled pixel logits
    (the pair's logit difference is upsampled: bilinear interpolation is linear)."""
    total = 0
    for layer, tok in enumerate(tokens):
        logits = model.pixel_logits(text, tok, layer, grid)
        s = logits.shape[1] // 2
        diff = F.interpolate(logits[:, s:] - logits[:, :s], size=(size, size), mode="bilinear", align_corners=True)
        total = total + torch.sigmoid(diff).mean(1)
    return total / len(tokens)


def topk_means(full: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` largest pixels of each unsmoothed ``[B, S, S]`` map."""
    return full.flatten(1).topk(k, dim=1).values.mean(1)


def class_scores(probs: np.ndarray, top: np.ndarray, alpha: float = 0.5, normalise: bool = True) -> np.ndarray:
    """``alpha * minmax(probs) + (1 - alpha) * minmax(top)`` over the class, ``+ 1e-8`` in the denominators."""
    if normalise:
        probs = (probs - probs.min()) / (probs.max() - probs.min() + 1e-8)
        top = (top - top.min()) / (top.max() - top.min() + 1e-8)
    return alpha * probs + (1 - alpha) * top


class BayesPflBackend:
    """Bayes-PFL zero-shot maps and scores as a :class:`~anorefiner.zsad.Backend` (from the feature cache)."""

    def __init__(self, config: BayesPflConfig | None = None, backbone=None, name: str = "bayes_pfl", seed: int = 0):
        from ...seeding import rng

        self.config = c = config or BayesPflConfig()
        self.backbone, self.name, self.seed = backbone, name, int(seed)
        if backbone is None or not hasattr(backbone, "image_embedding") or not hasattr(backbone, "model"):
            raise ValueError("bayes_pfl needs the CLIP backbone (text tower and image embedding): pass --backbone")
        if not c.checkpoint:
            raise ValueError("bayes_pfl needs option 'checkpoint' (the model trained by rule train_backend)")
        if min(c.sample_num, c.batch_size, c.topk, c.topk_small) < 1 or not 0 <= c.alpha <= 1 or c.sigma < 0:
            raise ValueError(f"bayes_pfl: bad options sample_num={c.sample_num}, batch_size={c.batch_size}, "
                             f"topk={c.topk}/{c.topk_small} (>= 1), alpha={c.alpha} (0..1), sigma={c.sigma} (>= 0)")
        self.device = getattr(backbone, "device", None) or torch.device(c.device)
        self.model, meta = load_model(c.checkpoint, backbone)
        self.model.to(self.device)
        self.stage = int(c.stage or meta.get("stage", 2))
        if self.stage not in (1, 2):
            raise ValueError(f"bayes_pfl option stage must be 1 or 2, got {self.stage}")
        self.tokens = class_tokens(backbone, [c.class_name])
        self.map_size = int(c.map_size or backbone.resolution)
        k = c.topk_small if c.class_name in tuple(c.topk_small_classes) else c.topk
        self.topk = effective_topk(k, self.map_size ** 2, c.topk_reference)
        embed = int(self.model.PFL_normal.state.shape[1])
        eps = torch.from_numpy(rng(self.seed, "bayes_pfl", "state").standard_normal((2, c.sample_num, embed))).float()
        with torch.no_grad():  # forward_ensemble: the image-agnostic samples, drawn once per test run
            self.state_z = [flow_samples(f, eps[i].to(self.device)) for i, f in
                            enumerate((self.model.PFL_normal, self.model.PFL_abnormal))]
        self._queries = 0
        self.last_info = {"map_level": MAP_LEVEL, "map_size": self.map_size, "checkpoint": str(c.checkpoint),
                          "stage": self.stage, "sample_num": c.sample_num, "topk": self.topk, "sigma": c.sigma,
                          "class_minmax": bool(c.class_minmax), "alpha": c.alpha, "samples": "run seed"}

    def _score(self, layers: dict, cls, streams: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token-grid smoothed maps ``[N,h,w]``, text probabilities and top-k means ``[N]`` of cached features;
        ``streams[i]`` names the random stream of image i's flow samples."""
        from ...seeding import rng

        c, names = self.config, list(self.backbone.layers)
        missing = [k for k in names if k not in layers]
        if missing:
            raise ValueError(f"bayes_pfl: layers {missing} not in the features (have {list(layers)})")
        if cls is None:
            raise ValueError("bayes_pfl: no class token for these features (the flows need the global embedding)")
        n, h, w, _ = layers[names[0]].shape
        if n == 0:
            raise ValueError("bayes_pfl: no images to score (empty category)")
        cls, r = float_tensor(cls), c.sample_num
        maps, probs, tops = [], [], []
        for a in range(0, n, c.batch_size):
            b = min(n, a + c.batch_size) - a
            toks = [float_tensor(layers[k][a : a + b]).reshape(b, h * w, -1).to(self.device) for k in names]
            with torch.no_grad():
                g = self.backbone.image_embedding(cls[a : a + b], normalize=False).float().to(self.device)
                eps = np.stack([rng(self.seed, "bayes_pfl", *streams[a + i]).standard_normal((r, g.shape[1]))
                                for i in range(b)])
                text = monte_carlo_text(self.model, self.backbone, self.tokens, g,
                                        torch.from_numpy(eps).float().to(self.device), self.state_z)
                logits = self.model.image_logits(text, g, toks if self.stage == 2 else None)
                probs.append(pair_probs(logits).mean(1).cpu().numpy())
                full = full_map(self.model, text, toks, (h, w), self.map_size).float()
                tops.append(topk_means(full, self.topk).cpu().numpy())
            sm = gaussian_smooth(full.cpu().double(), c.sigma, c.truncate)
            maps.append(patch_map(sm, (h, w)).numpy())
        return np.concatenate(maps), np.concatenate(probs), np.concatenate(tops)

    def coarse(self, feats):
        from .. import CoarseResult

        maps, probs, tops = self._score(feats.layers, feats.cls, [("image", i) for i in range(len(feats.ids))])
        scores = class_scores(probs.astype(np.float64), tops.astype(np.float64), self.config.alpha,
                              self.config.class_minmax)
        self.last_info.update({"n_images": int(len(maps))})
        LOG.info("bayes_pfl: %d maps %s (%s; stage %d, %d samples, top-%d)", len(maps), tuple(maps.shape[1:]),
                 MAP_LEVEL, self.stage, self.config.sample_num, self.topk)
        return CoarseResult(maps=maps.astype(np.float32), scores=scores.astype(np.float32))

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude):
        """Maps of PGT's pseudo-anomalies from their own tokens and class tokens (references play no role); each
        call draws its flow samples from a new stream of the run's seed."""
        self._queries += 1
        n = len(next(iter(query_layers.values())))
        maps, _, _ = self._score(query_layers, query_cls, [("query", self._queries, i) for i in range(n)])
        return torch.as_tensor(maps.astype(np.float32))
