"""RareCLIP (ICCV 2025): a trained text branch plus a training-free online rarity memory per category.

Facts from ``hy28hy/RareCLIP_v1@a8e6d46`` (specs/backends.md sections 0 and 3; ``rareclip.py``
``encode_text_with_prompt_ensemble`` and ``process_image_and_update``, ``test.py`` arguments):

* text: APRIL-GAN's 7 normal / 5 abnormal states filled with both "object" and "texture", 35
  templates, normalised-averaged-renormalised (class-agnostic: :data:`PROMPTS`); temperature 20;
* per text layer (12/16/20/24): ``softmax(20 * L2norm(Linear_l(raw)) @ T)[abnormal]`` at *patch*
  level; the text map is the mean over the layers; foreground prior: running mean of the text maps of
  the stream so far (current included), text map = max(current, prior), foreground = its top 50%;
* rarity memory per (r in {1, 3}, layer in 6/12/18/24) (:mod:`.rareclip_memory`), image rarity from
  the foreground-mean tokens (AAIF), ``rare += fg_score * (1 + minmax(prior))`` when fg_score > 0;
* stream weighting (:func:`~.rareclip_memory.stream_weights`), bilinear upsampling (align_corners)
  to the input size, Gaussian blur (sigma 4, kernel 25), score = max(map) + text probability, kNN
  re-scoring over the images seen (the memory keeps the raw scores);
* each category's test images are processed one by one in the order ``random.seed(seed);
  random.shuffle`` gives (``test.py``; 5 seeds reported), every category with an empty memory;
  results come back in index order.

Store choice (as :mod:`.april_gan`): maps are token grids, the area mean of the final
full-resolution map over each patch (``map_level`` in :attr:`RareClipBackend.last_info`).

``score_queries`` (PGT's pseudo-anomalies; our reading, the paper has no such use): a memory is built
from the reference images in the seeded stream order (without the query's source image), then each
query is scored against it *without* updating it (the official ``update=False`` path), weighted as
a late-stream image (4/3 rare + 1/3 text; text only if there are no references). One memory is built
per distinct excluded image, so the cost is (distinct sources) x (references) image steps.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...log import LOG, progress
from ..april_gan.backend import load_adapters, patch_map
from ..maps import float_tensor, minmax
from ..maps import resolve_device as _resolve_device
from ..prompts import APRIL_ABNORMAL, APRIL_NORMAL, APRIL_TEMPLATES, PromptSet
from .memory import RarityBank, aggregate, gaussian_blur, rescore, stream_weights

MAP_LEVEL = "token grid: area mean of the official full-resolution map (upsampled, blurred) per patch"
CLASS_WORDS = ("object", "texture")  # rareclip.py: every state filled with both words (class-agnostic)
PROMPTS = PromptSet("rareclip", tuple(s.format(w) for w in CLASS_WORDS for s in APRIL_NORMAL),
                    tuple(s.format(w) for w in CLASS_WORDS for s in APRIL_ABNORMAL), APRIL_TEMPLATES,
                    "normalized_mean")
PROMPT_NAME = "+".join(CLASS_WORDS)  # the "class name" of the text cache entry


@dataclass
class RareClipConfig:
    """Options of the ``rareclip`` backend; defaults are ``test.py``'s (``a8e6d46``) unless said."""

    checkpoint: str = ""  # 4 text-branch adapters: rule train_backend, or weights/{mvtec,visa}_pretrained.pth
    text_layers: tuple = ("12", "16", "20", "24")  # --features_list_text
    rare_layers: tuple = ("6", "12", "18", "24")  # --features_list_rare
    r_list: tuple = (1, 3)  # rareclip.py self.r_list
    text_temperature: float = 20.0  # --text_temp
    foreground_ratio: float = 0.5  # rareclip.py self.foreground_ratio
    keep_ftime: float = 3.0  # --keep_ftime: prototypes kept = 3 x patches (SCS when exceeded)
    keep_rows: int = 200  # --keep_snum: PSM rows (historical images)
    keep_images: int = 1000  # --keep_inum: image memories (score, global, AAIF); oldest dropped beyond
    topk: int = 3  # --topk
    ls_ratio: float = 0.01  # --LS_ratio: divide by the 99th percentile
    rare_thd: float = 0.3  # --rare_thd
    early_images: int = 3  # images 1..3 weigh 2/3 + 2/3 (process_image_and_update), then 4/3 + 1/3
    rescore: bool = True  # --Rs 1
    rescore_freq: int = 20  # --Rs_freq
    rescore_temperature: float = 200.0  # --Rs_temp
    rescore_neighbours: int = 9  # --max_Rs_num 8, plus one (self included)
    blur_sigma: float = 4.0  # GaussianBlur(sigma=4), hard-coded in the constructor
    blur_kernel: int = 25  # int(2 * 3 * --sigma + 1) with --sigma 4
    map_size: int | None = None  # None = the backbone's input size (518 officially)
    text_cache: str = ""  # folder of the text cache ("" = no cache); the workflow: results/text
    chunk: int = 2048  # rows per similarity block (memory bound; results do not depend on it)
    batch_size: int = 16  # images per text-map computation (memory bound; results do not depend on it)
    device: str = "auto"


def text_embeddings(backbone, cache_dir: str | None = None) -> torch.Tensor:
    """``[2, D]`` class-agnostic (normal, abnormal) text embeddings (cached like the other backends)."""
    from ..prompts import text_embeddings as _text

    return _text(backbone, PROMPT_NAME, PROMPTS, cache_dir or None)


def text_maps(adapters, tokens: list[torch.Tensor], text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Test-time text map ``[B, L]``: mean over layers of softmax(T * L2norm(Linear(raw)) @ text)[1]."""
    probs = [torch.softmax(temperature * p @ text.T.to(p.dtype), dim=-1)[..., 1] for p in adapters(tokens)]
    return sum(probs) / len(probs)


def stream_order(n: int, seed: int) -> list[int]:
    """``random.seed(seed); random.shuffle(list)`` of ``test.py``, on the indices 0..n-1."""
    order = list(range(n))
    random.Random(int(seed)).shuffle(order)
    return order


class RareStream:
    """The per-category online state (``renew_memory``) and one image step (``process_image_and_update``)."""

    def __init__(self, config: RareClipConfig, patches: int, size: int):
        c = self.config = config
        self.size = size
        keep = int(c.keep_ftime * patches)
        self.banks = {(r, l): RarityBank(keep, c.keep_rows, c.topk, c.ls_ratio, c.rare_thd, c.chunk)
                      for r in c.r_list for l in c.rare_layers}
        self.foreground: torch.Tensor | None = None
        self.seen = 0
        self.aaif = {l: [] for l in c.rare_layers}
        self.globals: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []

    def step(self, text_map: torch.Tensor, text_prob: torch.Tensor, g: torch.Tensor, raw: dict, grid,
             update: bool = True, late: bool = False):
        """One image: ``text_map [L]``, ``text_prob`` scalar, ``g`` normalised global ``[D]``, ``raw``
        rarity layer -> ``[h, w, C]`` tokens. Returns ``(full map [S, S], score)``."""
        c = self.config
        if update:
            self.foreground = text_map.clone() if self.foreground is None else \
                (self.foreground * self.seen + text_map) / (self.seen + 1)
        fg_idx = None
        if self.foreground is not None:
            text_map = torch.maximum(text_map, self.foreground)
            if c.foreground_ratio < 1:
                fg_idx = torch.topk(self.foreground, max(1, int(self.foreground.numel() * c.foreground_ratio))).indices
        rare = torch.zeros_like(text_map)
        for (r, l), bank in self.banks.items():
            feats = aggregate(raw[l], r)
            scored = bank.score(feats)
            if scored is not None:
                rare = rare + scored[0]
            if update:
                bank.update(feats, scored)
        rare = rare / len(self.banks)
        gsim = g @ torch.stack(self.globals + [g]).T  # self last (the official IF_memory incl. the image)
        fg_score = torch.zeros((), dtype=text_map.dtype, device=text_map.device)
        for l in c.rare_layers:
            tok = raw[l].reshape(-1, raw[l].shape[-1])
            aaif = F.normalize((tok if fg_idx is None else tok[fg_idx]).mean(0), dim=0)
            if self.aaif[l]:
                s = torch.stack(self.aaif[l]) @ aaif
                k = max(1, int(math.ceil(s.numel() * c.rare_thd)))
                fg_score = fg_score + 1 - torch.topk(s, k).values.mean()
                gsim = gsim + torch.cat([s, s.new_ones(1)])
            if update:
                self.aaif[l].append(aaif)
        fg_score = fg_score / len(c.rare_layers)
        if fg_score > 0:
            rare = rare + fg_score * (1 + minmax(self.foreground))
        has_memory = self.seen > 0
        w_rare, w_text = stream_weights(self.seen if not late else c.early_images + 1, c.early_images) \
            if has_memory else (0.0, 1.0)
        amap = w_rare * rare + w_text * text_map
        full = F.interpolate(amap.reshape(1, 1, *grid), size=(self.size, self.size), mode="bilinear",
                             align_corners=True)[:, 0]
        full = gaussian_blur(full, c.blur_kernel, c.blur_sigma)[0]
        raw_score = full.max() + text_prob
        score = raw_score
        if c.rescore:
            score = rescore(gsim, torch.stack(self.scores + [raw_score]), c.rescore_freq, c.rescore_temperature,
                            c.rescore_neighbours)
        if update:
            self.globals.append(g)
            self.scores.append(raw_score)
            self.seen += 1
            if len(self.scores) > c.keep_images:  # the fork's fixed trimming (a8e6d46 never trims at <= 1000)
                self.scores.pop(0)
                self.globals.pop(0)
                for l in c.rare_layers:
                    self.aaif[l].pop(0)
        return full, score


class RareClipBackend:
    """RareCLIP maps and scores as a :class:`~anorefiner.zsad.Backend` (one online stream per category)."""

    def __init__(self, config: RareClipConfig | None = None, backbone=None, name: str = "rareclip", seed: int = 0):
        self.config = config or RareClipConfig()
        self.backbone, self.name, self.seed = backbone, name, int(seed)
        c = self.config
        if backbone is None or not hasattr(backbone, "image_embedding"):
            raise ValueError("rareclip needs the CLIP backbone (text tower and image embedding): pass --backbone")
        if not c.checkpoint:
            raise ValueError("rareclip needs option 'checkpoint' (trained text adapters: rule train_backend, "
                             "or the official files, backends.<name>.weights: official)")
        for opt in ("text_layers", "rare_layers", "r_list"):
            if not list(getattr(c, opt)):
                raise ValueError(f"rareclip: option {opt!r} is empty")
        self.text_layers = [str(v) for v in c.text_layers]
        self.rare_layers = [str(v) for v in c.rare_layers]
        c.text_layers, c.rare_layers = tuple(self.text_layers), tuple(self.rare_layers)
        self.device = _resolve_device(c.device)
        self.adapters = load_adapters(c.checkpoint, len(self.text_layers), getattr(backbone, "width", None),
                                      what="rareclip")
        self.adapters.to(self.device)
        self.text = text_embeddings(backbone, c.text_cache).to(self.device)
        self.map_size = int(c.map_size or backbone.resolution)
        self._prepared: tuple | None = None  # (feature ids, _prepare of them): PGT scores many query batches
        self.last_info = {"map_level": MAP_LEVEL, "map_size": self.map_size, "checkpoint": str(c.checkpoint),
                          "seed": self.seed, "stream": "random.Random(seed).shuffle of the index order"}

    def _check_layers(self, layers: dict) -> None:
        missing = [k for k in dict.fromkeys(self.text_layers + self.rare_layers) if k not in layers]
        if missing:
            raise ValueError(f"rareclip: layers {missing} are not in the features (have {list(layers)}); "
                             f"the backbone config must tap text_layers {self.text_layers} and rare_layers "
                             f"{self.rare_layers}")

    def _prepare(self, layers: dict, cls) -> tuple:
        """Per image: text maps ``[N, L]``, text probabilities ``[N]``, normalised globals ``[N, D]``."""
        if cls is None:
            raise ValueError("rareclip: the features have no class token (a CLIP ViT cache is needed)")
        self._check_layers(layers)
        n, h, w, _ = layers[self.text_layers[0]].shape
        maps = []
        with torch.no_grad():
            bs = max(1, int(self.config.batch_size))
            for a in range(0, n, bs):
                toks = [float_tensor(layers[k][a : a + bs]).reshape(-1, h * w, layers[k].shape[-1]).to(self.device)
                        for k in self.text_layers]
                maps.append(text_maps(self.adapters, toks, self.text, self.config.text_temperature).cpu())
            g = torch.as_tensor(self.backbone.image_embedding(float_tensor(cls), normalize=True)).float().to(self.device)
            prob = torch.softmax(self.config.text_temperature * g @ self.text.T, dim=-1)[:, 1]
        return torch.cat(maps), prob.cpu(), g.cpu(), (h, w)

    def _category(self, feats) -> tuple:
        """:meth:`_prepare` of the category's own features, computed once per feature set."""
        key = tuple(np.asarray(feats.ids).tolist())
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = (key, self._prepare(feats.layers, feats.cls))
        return self._prepared[1]

    def _raw(self, layers: dict, i: int) -> dict:
        return {k: float_tensor(layers[k][i]).to(self.device) for k in self.rare_layers}

    def _run(self, stream: RareStream, layers, order, maps, prob, g, grid, update=True, late=False):
        out = {}
        with torch.no_grad():
            for i in order:
                full, score = stream.step(maps[i].to(self.device), prob[i].to(self.device), g[i].to(self.device),
                                          self._raw(layers, i), grid, update=update, late=late)
                out[i] = (patch_map(full.unsqueeze(0), grid)[0].cpu(), float(score))
        return out

    def coarse(self, feats):
        from .. import CoarseResult

        n = len(feats.ids)
        if n == 0:
            raise ValueError("rareclip: empty category (no test images in the feature cache)")
        maps, prob, g, grid = self._category(feats)
        order = stream_order(n, self.seed)
        stream = RareStream(self.config, grid[0] * grid[1], self.map_size)
        res = {}
        for i in progress(order, desc=f"rareclip stream (seed {self.seed})", unit="img"):
            res.update(self._run(stream, feats.layers, [i], maps, prob, g, grid))
        if n == 1:
            LOG.warning("rareclip: a category of one image: no memory, text branch only (official behaviour)")
        out_maps = torch.stack([res[i][0] for i in range(n)]).numpy().astype(np.float32)
        scores = np.asarray([res[i][1] for i in range(n)], dtype=np.float32)
        self.last_info["stream_order"] = order
        LOG.info("rareclip: %d maps %s, seed %d (%s)", n, grid, self.seed, MAP_LEVEL)
        return CoarseResult(maps=out_maps, scores=scores)

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude):
        """Maps ``[M, h, w]`` of PGT's queries against a memory of the references (module docstring)."""
        refs = [int(i) for i in reference_idx]
        m = len(next(iter(query_layers.values())))
        exclude = [None] * m if exclude is None else list(exclude)
        if len(exclude) != m:
            raise ValueError(f"rareclip score_queries: exclude has {len(exclude)} entries for {m} queries")
        rank = {j: p for p, j in enumerate(stream_order(len(feats.ids), self.seed))}
        bad = [j for j in refs if j not in rank]
        if bad:
            raise ValueError(f"rareclip score_queries: reference indices {bad[:5]} outside 0..{len(feats.ids) - 1}")
        refs = sorted(set(refs), key=lambda j: rank[j])
        maps, prob, g, grid = self._category(feats)
        qmaps, qprob, qg, qgrid = self._prepare(query_layers, query_cls)
        if qgrid != grid:
            raise ValueError(f"rareclip score_queries: query grid {qgrid} != feature grid {grid}")
        out = [None] * m
        groups: dict = {}
        for q, e in enumerate(exclude):
            groups.setdefault(None if e is None else int(e), []).append(q)
        for e, queries in groups.items():
            stream = RareStream(self.config, grid[0] * grid[1], self.map_size)
            self._run(stream, feats.layers, [j for j in refs if j != e], maps, prob, g, grid)
            got = self._run(stream, query_layers, queries, qmaps, qprob, qg, grid, update=False, late=True)
            for q in queries:
                out[q] = got[q][0]
        return torch.stack(out)
