"""AnomalyCLIP (ICLR 2024): object-agnostic learned prompts on a dual-path (DPAM) CLIP image tower.

Facts from ``zqhang/AnomalyCLIP@45ed4dd`` (specs/tta.md Part B.1):

* prompts (``prompt_ensemble.py`` AnomalyCLIP_PromptLearner): SOS + 12 learned context vectors ``ctx_pos`` /
  ``ctx_neg`` (N(0, 0.02)) + the words "object." (normal) or "damaged object." (abnormal) + EOS; class-agnostic;
* compound prompts: ``depth - 1`` = 8 tensors ``[4, text width]`` overwrite token positions 1-4 before text
  blocks 2-9 (``ResidualAttentionBlock_learnable_token``; the official code casts them with ``.half()``, so
  their values are fp16-rounded: option ``compound_fp16``); 8 ``compound_prompt_projections``
  ``Linear(width, 896)`` are built and saved but never used: kept so the official files load as ours;
* image tower: :mod:`.anomalyclip_dpam` (v-v second path in the last ``dpam_layer - 1`` blocks); patch features =
  ``ln_post`` + ``proj`` of the second path, L2-normalised; global = original CLS ``@ proj`` without ``ln_post``;
* text pair t = (t_norm, t_abn) L2-normalised; image score = softmax(cos(g, t) / 0.07)[abn]; per map layer
  patch probs = softmax(cos(f, t) / 0.07), the PROBABILITIES bilinearly upsampled (align_corners=False) to the
  input size, map = (p_abn + 1 - p_norm) / 2 = p_abn, summed over the map layers, then
  ``scipy.ndimage.gaussian_filter(sigma=4)`` (``test.py``);
* map layers: the last block only (the fixed official setting, ``--features_list 24``; B.1 explains why the
  earlier [6, 12, 18, 24] maps were all the last one's).

Store choice: the coarse store holds token-grid maps, the area mean of the official (smoothed) full-resolution
map over each patch (``map_level`` in ``last_info``). The backend runs its own forward from images (DPAM changes
the visual forward), so PGT cannot score cached features with it (``refinable`` False).

Backbone: OpenAI ViT-L-14-336 at 518 with QuickGELU (``AnomalyCLIP_lib/build_model.py`` rebuilds the OpenAI
weights in its own blocks with QuickGELU, unlike APRIL-GAN's GELU); position embedding resized bilinearly
(option ``pos_embed``, :func:`.anomalyclip_dpam.with_position_embedding`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...log import LOG
from .dpam import (default_dpam_layer, dual_path_forward, global_feature, project_tokens,
                               with_position_embedding)
from ..april_gan.backend import patch_map
from ..maps import gaussian_smooth as smooth  # test.py: scipy gaussian_filter, sigma 4
from ..maps import resolve_device as _resolve_device

CHECKPOINT_KEY = "prompt_learner"  # train.py saves {"prompt_learner": state_dict}
MAP_LEVEL = "token grid: area mean of the official map (bilinear probabilities -> p_abn -> sum -> Gaussian) per patch"
NORMAL_STATE, ABNORMAL_STATE = "{}", "damaged {}"  # state_normal_list / state_anomaly_list
OBJECT = "object"  # classnames = ["object"]: the prompts are object-agnostic
OFFICIAL_PROJECTION_DIM = 896  # Linear(ctx_dim, 896) of the official code (ViT-L/14's 768-d text width)
OFFICIAL_TEXT_WIDTH = 768


@dataclass
class AnomalyCLIPConfig:
    """Options of the ``anomalyclip`` backend (config ``backends.<name>.options``)."""

    checkpoint: str = ""  # prompt-learner file; the coarse rule passes the trained or official one
    n_ctx: int = 12  # test.py --n_ctx ("Prompt_length")
    depth: int = 9  # test.py --depth: 8 compound prompts (blocks 2-9)
    t_n_ctx: int = 4  # test.py --t_n_ctx: compound prompt length
    dpam_layer: int | None = None  # None: test.py's DAPM_replace(DPAM_layer=20) on 24 blocks (6-24 dual), the
    #                                 same single-path share on other depths (anomalyclip_dpam.default_dpam_layer)
    map_layers: tuple = ()  # () = the last block (--features_list 24, see docstring)
    temperature: float = 0.07  # compute_similarity / test.py: cos / 0.07
    sigma: float = 4.0  # test.py --sigma 4 (scipy gaussian_filter on the full-resolution map)
    map_size: int | None = None  # None = the backbone's input size (518, --image_size)
    pos_embed: str = "bilinear"  # AnomalyCLIP.py L363-370 (plain bilinear resize); "backbone": the backbone's
    compound_fp16: bool = True  # the official .half() cast of the compound prompts (a quirk, kept)
    batch_size: int = 8  # images per forward (memory only; test.py uses 1, results do not depend on it)
    device: str = "auto"  # filled by the pipeline (clip flag); the forward runs where the backbone lives


def projection_dim(text_width: int) -> int:
    """Output width of the unused compound projections: the official 896 for a 768-d text tower, else the
    text width (any value would do: they never enter the forward; only the official files need 896)."""
    return OFFICIAL_PROJECTION_DIM if text_width == OFFICIAL_TEXT_WIDTH else int(text_width)


class PromptLearner(torch.nn.Module):
    """AnomalyCLIP_PromptLearner's parameters and buffers under the official state-dict names."""

    def __init__(self, backbone, n_ctx: int = 12, depth: int = 9, t_n_ctx: int = 4, seed: int = 111):
        super().__init__()
        from ...backbones.clip_prompting import token_embeddings, tokenize

        if n_ctx < 1 or depth < 1 or t_n_ctx < 1:
            raise ValueError(f"anomalyclip: n_ctx={n_ctx}, depth={depth}, t_n_ctx={t_n_ctx} must be >= 1")
        model = backbone.model
        width = int(model.ln_final.weight.shape[0])
        self.n_ctx, self.depth, self.t_n_ctx = int(n_ctx), int(depth), int(t_n_ctx)
        gen = torch.Generator().manual_seed(int(seed))
        self.ctx_pos = torch.nn.Parameter(torch.randn(1, 1, n_ctx, width, generator=gen) * 0.02)
        self.ctx_neg = torch.nn.Parameter(torch.randn(1, 1, n_ctx, width, generator=gen) * 0.02)
        self.compound_prompts_text = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(t_n_ctx, width, generator=gen) * 0.02) for _ in range(depth - 1)])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            single = torch.nn.Linear(width, projection_dim(width))
        # _get_clones: deep copies of one layer (identical weights), never used in the forward
        self.compound_prompt_projections = torch.nn.ModuleList([copy.deepcopy(single) for _ in range(depth - 1)])
        prefix = " ".join(["X"] * n_ctx)
        texts = [f"{prefix} {NORMAL_STATE.format(OBJECT)}.", f"{prefix} {ABNORMAL_STATE.format(OBJECT)}."]
        tokens = tokenize(backbone, texts).cpu()
        with torch.no_grad():
            emb = token_embeddings(backbone, tokens).float().cpu()
        for i, tag in enumerate(("pos", "neg")):
            self.register_buffer(f"token_prefix_{tag}", emb[i : i + 1, :1].unsqueeze(0).clone())
            self.register_buffer(f"token_suffix_{tag}", emb[i : i + 1, 1 + n_ctx :].unsqueeze(0).clone())
            self.register_buffer(f"tokenized_prompts_{tag}", tokens[i : i + 1].unsqueeze(0).clone())

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``(prompt embeddings [2, L, D], token ids [2, L], compound prompts)``: normal first."""
        pos = torch.cat([self.token_prefix_pos, self.ctx_pos, self.token_suffix_pos], dim=2)
        neg = torch.cat([self.token_prefix_neg, self.ctx_neg, self.token_suffix_neg], dim=2)
        prompts = torch.cat([pos.reshape(-1, *pos.shape[2:]), neg.reshape(-1, *neg.shape[2:])], dim=0)
        tokens = torch.cat([self.tokenized_prompts_pos.reshape(-1, self.tokenized_prompts_pos.shape[-1]),
                            self.tokenized_prompts_neg.reshape(-1, self.tokenized_prompts_neg.shape[-1])])
        return prompts, tokens, list(self.compound_prompts_text)


def encode_text(backbone, learner: PromptLearner, compound_fp16: bool = True) -> torch.Tensor:
    """``[2, D]`` L2-normalised (normal, abnormal) text features (``encode_text_learn``), with gradients.

    Before text block ``b`` (1-based) in ``2 .. depth`` positions ``1 .. t_n_ctx`` are overwritten by compound
    prompt ``b - 2`` (while prompts remain; blocks past the tower's depth are simply absent).
    """
    from ...backbones.clip_prompting import encode_text_embeddings, eot_index

    prompts, tokens, compound = learner()
    device = backbone.device
    prompts, tokens = prompts.to(device), tokens.to(device)
    n = learner.t_n_ctx

    def before_block(block: int, x: torch.Tensor) -> torch.Tensor:
        k = block - 2
        if 0 <= k < len(compound):
            ctx = compound[k].to(device)
            if compound_fp16:
                ctx = ctx.half()
            ctx = ctx.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], ctx, x[:, 1 + n :]], dim=1)
        return x

    x = encode_text_embeddings(backbone, prompts.to(backbone.model.transformer.get_cast_dtype()), eot_index(tokens),
                               before_block=before_block)
    return F.normalize(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=-1)


def patch_probs(feats: torch.Tensor, text: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """``[N, h, w, D]`` normalised features, ``[2, D]`` text -> ``softmax(cos / T)`` as ``[N, 2, h, w]``."""
    probs = torch.softmax(torch.einsum("nhwd,cd->nhwc", feats, text.to(feats.dtype)) / temperature, dim=-1)
    return probs.permute(0, 3, 1, 2)


def upsample_probs(probs: torch.Tensor, size: int) -> torch.Tensor:
    """``get_similarity_map``: bilinear (align_corners=False) upsampling of the probabilities."""
    return F.interpolate(probs, size=(size, size), mode="bilinear", align_corners=False)


def full_map(probs: list[torch.Tensor], size: int) -> torch.Tensor:
    """``[N, size, size]``: sum over map layers of ``(p_abn + 1 - p_norm) / 2`` of the upsampled probabilities."""
    out = 0
    for p in probs:
        up = upsample_probs(p, size)
        out = out + (up[:, 1] + 1 - up[:, 0]) / 2.0
    return out


def image_scores(glob: torch.Tensor, text: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """``softmax(cos(g, t) / T)[abnormal]`` of L2-normalised ``g [N, D]`` and text ``[2, D]``."""
    g = F.normalize(glob, dim=-1)
    return torch.softmax(g @ F.normalize(text.to(g.dtype), dim=-1).T / temperature, dim=-1)[:, 1]


def expected_shapes(backbone, n_ctx: int, depth: int, t_n_ctx: int) -> dict[str, tuple]:
    """The state-dict keys and shapes of a prompt learner for ``backbone`` (official naming)."""
    model = backbone.model
    width = int(model.ln_final.weight.shape[0])
    length = int(model.positional_embedding.shape[0])
    out = {}
    for tag in ("pos", "neg"):
        out[f"ctx_{tag}"] = (1, 1, n_ctx, width)
        out[f"token_prefix_{tag}"] = (1, 1, 1, width)
        out[f"token_suffix_{tag}"] = (1, 1, length - 1 - n_ctx, width)
        out[f"tokenized_prompts_{tag}"] = (1, 1, length)
    for i in range(depth - 1):
        out[f"compound_prompts_text.{i}"] = (t_n_ctx, width)
    return out


def load_prompt_learner(path: str | Path, backbone, n_ctx: int = 12, depth: int = 9, t_n_ctx: int = 4
                        ) -> PromptLearner:
    """A prompt learner from a checkpoint (ours or the official ``epoch_15.pth``), keys and shapes checked."""
    from ..checkpoints import load_weights_only

    path = Path(path)
    obj = load_weights_only(path, "anomalyclip checkpoint")
    state = obj.get(CHECKPOINT_KEY) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"anomalyclip checkpoint {path}: no {CHECKPOINT_KEY!r} state dict "
                         f"(top-level keys: {sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__})")
    learner = PromptLearner(backbone, n_ctx, depth, t_n_ctx)
    expected = {k: tuple(v.shape) for k, v in learner.state_dict().items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"anomalyclip checkpoint {path}: keys differ from the prompt learner's "
                         f"(n_ctx={n_ctx}, depth={depth}): missing {missing[:6]}, unexpected {extra[:6]}")
    width = int(learner.ctx_pos.shape[-1])
    proj_out = int(state["compound_prompt_projections.0.bias"].shape[0]) if depth > 1 else 0
    for key, shape in expected.items():
        if key.startswith("compound_prompt_projections."):
            # unused in the forward: any Linear(width -> k) is accepted (the official files hold k = 896)
            shape = (proj_out, width) if key.endswith(".weight") else (proj_out,)
        got = tuple(state[key].shape)
        if got != shape:
            raise ValueError(f"anomalyclip checkpoint {path}: {key} has shape {got}, expected {shape} "
                             f"(backbone {backbone.name}, n_ctx={n_ctx}, t_n_ctx={t_n_ctx})")
    if depth > 1 and proj_out != learner.compound_prompt_projections[0].out_features:
        learner.compound_prompt_projections = torch.nn.ModuleList(
            [torch.nn.Linear(width, proj_out) for _ in range(depth - 1)])
    learner.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()})
    return learner.eval().requires_grad_(False)


class AnomalyCLIPBackend:
    """AnomalyCLIP maps and scores as a :class:`~anorefiner.zsad.Backend` (scores images, not cached tokens).

    ``images``: ``indices -> list of uint8 [H,W,3]`` test images (set by the coarse stage).
    """

    def __init__(self, config: AnomalyCLIPConfig | None = None, backbone=None, name: str = "anomalyclip",
                 seed: int = 0, images=None):
        from .dpam import dpam_start

        self.config = c = config or AnomalyCLIPConfig()
        self.backbone, self.name, self.seed, self.images = backbone, name, int(seed), images
        if backbone is None or not hasattr(backbone, "visual") or not hasattr(backbone, "blocks"):
            raise ValueError("anomalyclip needs an open_clip ViT backbone (ViT-L-14-336 at 518): pass --backbone")
        if not c.checkpoint:
            raise ValueError("anomalyclip needs option 'checkpoint' (trained prompt learner: rule train_backend, "
                             "or the official files, backends.<name>.weights: official)")
        if c.temperature <= 0:
            raise ValueError(f"anomalyclip option temperature must be > 0, got {c.temperature}")
        n_blocks = len(backbone.blocks)
        self.dpam_layer = default_dpam_layer(n_blocks) if c.dpam_layer is None else int(c.dpam_layer)
        dpam_start(n_blocks, self.dpam_layer)
        self.map_layers = [int(v) for v in (c.map_layers or [n_blocks])]
        bad = [v for v in self.map_layers if not 1 <= v <= n_blocks]
        if bad or len(set(self.map_layers)) != len(self.map_layers):
            raise ValueError(f"anomalyclip option map_layers={list(c.map_layers)}: distinct blocks in 1..{n_blocks} "
                             f"expected")
        self.device = _resolve_device(c.device)
        self._visual = with_position_embedding(backbone, c.pos_embed)
        self.learner = load_prompt_learner(c.checkpoint, backbone, c.n_ctx, c.depth, c.t_n_ctx).to(backbone.device)
        with torch.no_grad():
            self.text = encode_text(backbone, self.learner, c.compound_fp16)
        self.map_size = int(c.map_size or backbone.resolution)
        self.last_info = {"map_level": MAP_LEVEL, "map_size": self.map_size, "map_layers": self.map_layers,
                          "dpam_layer": self.dpam_layer, "sigma": float(c.sigma),
                          "pos_embed": c.pos_embed, "checkpoint": str(c.checkpoint)}

    def score_batch(self, batch: torch.Tensor) -> dict:
        """Preprocessed images -> ``feats {block: [B,h,w,D]}``, ``full`` smoothed maps ``[B,S,S]``, token-grid
        ``maps [B,h,w]`` and image ``scores [B]``."""
        bb, c = self.backbone, self.config
        gh, gw = bb.grid
        with torch.no_grad():
            streams, last = dual_path_forward(self._visual, batch, tuple(self.map_layers), self.dpam_layer)
            feats = {str(k): project_tokens(bb, s)[:, 1:].reshape(s.shape[0], gh, gw, -1).float()
                     for k, s in streams.items()}
            text = self.text.to(last.device)
            probs = [patch_probs(feats[str(k)], text, c.temperature) for k in self.map_layers]
            full = smooth(full_map(probs, self.map_size).float().cpu(), c.sigma)
            scores = image_scores(global_feature(bb, last).float(), text, c.temperature).cpu()
        return {"feats": {k: v.cpu() for k, v in feats.items()}, "full": full,
                "maps": patch_map(full, (gh, gw)), "scores": scores}

    def _run(self, indices: list[int]) -> list[dict]:
        from ...log import progress

        if self.images is None:
            raise ValueError("anomalyclip scores images: the coarse stage needs --data-root (the dataset folder)")
        if len(indices) == 0:
            raise ValueError("anomalyclip: no images to score (empty category)")
        bs = max(1, int(self.config.batch_size))
        return [self.score_batch(self.backbone.preprocess(self.images(list(indices[a : a + bs]))))
                for a in progress(range(0, len(indices), bs), desc=self.name, unit="batch")]

    def features_and_scores(self, indices) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """For PA-CLIP's PAD+PAM: ``({block: [N,h,w,D]} DPAM-path ln_post+proj L2-normalised features,
        token-grid maps [N,h,w], image scores [N])`` of the images ``indices``."""
        out = self._run(list(indices))
        feats = {k: torch.cat([o["feats"][k] for o in out]).numpy().astype(np.float32) for k in out[0]["feats"]}
        maps = torch.cat([o["maps"] for o in out]).numpy().astype(np.float32)
        return feats, maps, torch.cat([o["scores"] for o in out]).numpy().astype(np.float32)

    def coarse(self, feats):
        from .. import CoarseResult

        _, maps, scores = self.features_and_scores(list(range(len(feats.ids))))
        LOG.info("anomalyclip: %d images, map layers %s, DPAM layer %d (%s)", len(maps), self.map_layers,
                 self.dpam_layer, MAP_LEVEL)
        return CoarseResult(maps=maps, scores=scores)

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude):
        raise NotImplementedError(
            "anomalyclip scores images (its dual-path forward starts at block 6), so PGT cannot score "
            "pseudo-anomalies from cached tokens; refine another backend's maps")
