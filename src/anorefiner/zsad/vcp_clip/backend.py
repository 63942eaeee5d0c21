"""VCP-CLIP (ECCV 2024), zero-shot: image-conditioned text prompts, a raw and a Post-VCP branch.

Facts from ``xiaozhen228/VCP-CLIP@4dd96ec`` (specs/backends.md sections 0 and 2):

* text: per-image ``E [B, 2, D]`` from Pre-VCP + deep text prompts (:mod:`.vcp_clip_prompts`), the global
  feature being the *un-normalised* ``ln_post(CLS) @ proj`` (``models/transformer.py`` l.605-609);
* raw branch (``test.py`` l.173-185): per layer ``p = L2norm(Linear_l(raw_l))`` (class token dropped, no
  ln_post), logits ``exp(tau1) * p @ E^T``, bilinear upsample to the input size (align_corners=True),
  softmax over the 2 classes, abnormal channel, **mean** over the layers;
* Post-VCP branch (``models/post_vcp.py`` Zero_Parameter, one module for all layers): ``F_s = L2norm(raw_l)``,
  ``q = conv1x1(D -> width)(E)``, ``k, v = conv1x1(width -> width)(F_s)``, 8 heads, softmax over the
  patches of ``q.k`` **without** 1/sqrt(d), ``attn.v`` -> conv1x1 -> L2 norm (no residual) = ``E'``;
  logits ``exp(tau2) * F_s @ E'^T``, then as the raw branch;
* final map (``test.py`` calcuate_metric): ``minmax_class(gaussian(0.2 raw + 0.8 new, sigma 8))``, scipy
  defaults (truncate 4, mode reflect), min-max over the whole class stack;
* image score: ``mean(top-2000 of raw) + mean(top-2000 of new)`` on the unsmoothed full-size maps (the
  official per-class min-max of the scores is monotone, so it is left out: scores stay comparable
  between runs).

Store choice (like :mod:`.april_gan`): the coarse store holds token-grid maps, the area mean of the final
full-resolution map over each patch. The class min-max is an affine map of all values, so it commutes
with the area mean and is applied to the token-grid maps with the stack's full-resolution min and max
(no stack of full-size maps is held). Option ``class_minmax`` (default on, official) makes a map depend
on the other images of the category; it is recorded in ``last_info``.

Checkpoint: the official dict (``trainable_linearlayer``, ``New_Lan_Embed``, ``Zero_try`` and the CLIP
prompt parameters at the top level by name), so the official Google-Drive files load with
:func:`load_vcp_checkpoint`; every shape is derived from the backbone (ViT-L-14-336: width 1024, embed
768), never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...log import LOG
from ..april_gan.backend import LinearAdapters, layer_logits, layer_probs, patch_map
from ..maps import float_tensor, gaussian_smooth
from ..maps import resolve_device as _resolve_device
from .prompts import (ABNORMAL_PROMPT, NORMAL_PROMPT, TEMPERATURE_INIT, PreVcp, TextPrompts,
                               slot_tokens, vcp_text)

GROUPS = ("trainable_linearlayer", "New_Lan_Embed", "Zero_try")
TOP_LEVEL = ("prompt_embeddings", "deep_prompt_embeddings", "prompt_proj.weight", "prompt_proj.bias",
             "prompt_norm.weight", "prompt_norm.bias", "prompt_text_projection")
MAP_LEVEL = ("token grid: area mean per patch of the official full-size map "
             "(class min-max of gaussian(0.2 raw + 0.8 new))")


@dataclass
class VcpClipConfig:
    """Options of the ``vcp_clip`` backend (config ``backends.<name>.options``)."""

    checkpoint: str = ""  # trained or official file (rule train_backend)
    normal_prompt: str = NORMAL_PROMPT  # models/prompt_ensemble.py, one template
    abnormal_prompt: str = ABNORMAL_PROMPT  # models/prompt_ensemble.py, one template
    heads: int = 8  # post_vcp.py Zero_Parameter num_heads (not stored in the checkpoint)
    alpha: float = 0.2  # test.py calcuate_metric alpha: weight of the raw branch
    sigma: float = 8.0  # test.py gaussian_filter sigma (pixels of the 518 map)
    truncate: float = 4.0  # scipy default used by test.py
    class_minmax: bool = True  # test.py normalize over the class stack (official); False = unnormalised maps
    topk: int = 2000  # test.py can_k: pixels of each branch's map in the image score, at topk_reference px
    topk_reference: int = 518  # map side the official topk is meant for; fewer pixels scale k (>= 1)
    map_size: int | None = None  # None = the backbone's input size (518 officially)
    batch_size: int = 8  # images per map computation (memory of the [B, 2, S, S] maps)
    device: str = "auto"  # used only when the backbone has no device (the text tower runs on the backbone's)


class PostVcp(torch.nn.Module):
    """Post-VCP (checkpoint group ``Zero_try``): text ``[B, S, D]`` refined by normalised tokens ``[B, L, C]``."""

    def __init__(self, dim_text: int, width: int, heads: int = 8):
        super().__init__()
        if width % heads:
            raise ValueError(f"vcp_clip: width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj_pre = torch.nn.Conv1d(dim_text, width, kernel_size=1)
        self.k_proj_pre_1 = torch.nn.Conv1d(width, width, kernel_size=1)
        self.v_proj_pre_1 = torch.nn.Conv1d(width, width, kernel_size=1)
        self.proj_post_t = torch.nn.Conv1d(width, width, kernel_size=1)
        self.prompt_temp_l1 = torch.nn.Parameter(torch.tensor(TEMPERATURE_INIT))  # tau2

    @staticmethod
    def _conv(conv: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        return conv(x.transpose(1, 2)).transpose(1, 2)

    def forward(self, text: torch.Tensor, fs: torch.Tensor) -> torch.Tensor:
        b, s, _ = text.shape
        n, hd = fs.shape[1], self.q_proj_pre.out_channels // self.heads
        q = self._conv(self.q_proj_pre, text.to(fs.dtype)).reshape(b, s, self.heads, hd)
        k = self._conv(self.k_proj_pre_1, fs).reshape(b, n, self.heads, hd)
        v = self._conv(self.v_proj_pre_1, fs).reshape(b, n, self.heads, hd)
        attn = torch.einsum("bshd,bnhd->bhsn", q, k).softmax(dim=-1)  # beta_t = 1: no 1/sqrt(d)
        out = torch.einsum("bhsn,bnhd->bshd", attn, v).reshape(b, s, self.heads * hd)
        return F.normalize(self._conv(self.proj_post_t, out), dim=-1)


@dataclass(frozen=True)
class VcpDims:
    width: int  # vision width (raw tokens)
    embed: int  # joint embedding (text projection output)
    text_width: int  # text tower width
    n_layers: int  # tapped vision layers
    text_blocks: int  # text transformer blocks
    class_tokens: int = 2  # r: Pre-VCP class tokens (official prompt_len 2)
    prompt_tokens: int = 1  # deep_prompt_len (official 1)

    @classmethod
    def of_backbone(cls, backbone, class_tokens: int = 2, prompt_tokens: int = 1) -> "VcpDims":
        m = backbone.model
        proj = m.text_projection
        embed = proj.out_features if isinstance(proj, torch.nn.Linear) else int(proj.shape[1])
        return cls(int(backbone.width), int(embed), int(m.token_embedding.weight.shape[1]), len(backbone.layers),
                   len(m.transformer.resblocks), class_tokens, prompt_tokens)


class VcpModel(torch.nn.Module):
    """All trainable parts: ``linear`` (raw branch), ``pre`` (Pre-VCP), ``prompts`` (text), ``post`` (Post-VCP)."""

    def __init__(self, dims: VcpDims, heads: int = 8):
        super().__init__()
        if dims.text_width != dims.embed:
            raise ValueError(f"vcp_clip: Pre-VCP puts {dims.embed}-d image embeddings into the {dims.text_width}-d "
                             "text tower; the backbone's widths must match (pre_vcp.py asserts it)")
        self.dims = dims
        self.linear = LinearAdapters(dims.width, dims.embed, dims.n_layers)
        self.pre = PreVcp(dims.embed, dims.class_tokens)
        self.prompts = TextPrompts(dims.text_width, dims.embed, dims.text_blocks, dims.prompt_tokens)
        self.post = PostVcp(dims.embed, dims.width, heads)

    def text(self, backbone, tokens, global_emb: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` un-normalised global embeddings -> per-image text ``[B, 2, D]``."""
        return vcp_text(backbone, tokens, self.pre(global_emb), self.prompts)

    def layer_logits(self, toks: list[torch.Tensor], text: torch.Tensor, grid) -> tuple[list, list]:
        """Raw-branch and Post-VCP logits ``[B, 2, h, w]`` per layer from raw tokens ``[B, L, C]``."""
        raw = [layer_logits(p, text, grid, self.pre.prompt_temp.exp()) for p in self.linear(toks)]
        new = []
        for t in toks:
            fs = F.normalize(t, dim=-1)
            new.append(layer_logits(fs, self.post(text, fs), grid, self.post.prompt_temp_l1.exp()))
        return raw, new

    def state_official(self) -> dict:
        """The official checkpoint layout (plain tensors)."""
        out = {"trainable_linearlayer": self.linear.state_dict(), "New_Lan_Embed": self.pre.state_dict(),
               "Zero_try": self.post.state_dict()}
        out.update({k: v for k, v in self.prompts.state_dict().items()})
        return {k: ({kk: vv.detach().cpu().clone() for kk, vv in v.items()} if isinstance(v, dict)
                    else v.detach().cpu().clone()) for k, v in out.items()}


def branch_maps(raw: list[torch.Tensor], new: list[torch.Tensor], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over layers of the upsampled abnormal probability: ``([B, S, S] raw, [B, S, S] new)``."""
    return (sum(layer_probs(lg, size)[:, 1] for lg in raw) / len(raw),
            sum(layer_probs(lg, size)[:, 1] for lg in new) / len(new))


def effective_topk(topk: int, n_pixels: int, reference: int = 518) -> int:
    """``topk`` at ``reference``^2 pixels, scaled down (at least 1) for smaller maps, never above the map."""
    k = topk if n_pixels >= reference * reference else round(topk * n_pixels / (reference * reference))
    return int(min(max(k, 1), n_pixels))


def image_scores(raw: torch.Tensor, new: torch.Tensor, k: int) -> torch.Tensor:
    """``mean(top-k raw) + mean(top-k new)`` per image of unsmoothed ``[B, S, S]`` maps."""
    return (raw.flatten(1).topk(k, dim=1).values.mean(1) + new.flatten(1).topk(k, dim=1).values.mean(1))


def smooth(raw: np.ndarray, new: np.ndarray, alpha: float, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """``gaussian(alpha raw + (1 - alpha) new)`` per image ``[B, S, S]`` (scipy, mode reflect), float64."""
    return gaussian_smooth(alpha * np.asarray(raw, np.float64) + (1 - alpha) * np.asarray(new, np.float64),
                           sigma, truncate)


def class_minmax(maps: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(maps - lo) / (hi - lo)`` (``utils/tools.py`` normalize with the class stack's min and max)."""
    if not hi > lo:
        LOG.warning("vcp_clip: constant maps over the class stack (min = max = %g); maps set to 0", lo)
        return np.zeros_like(maps)
    return (maps - lo) / (hi - lo)


def _dims_of(path: Path, obj: dict) -> VcpDims:
    """Dimensions read from the file itself (checks without a backbone)."""
    try:
        lin, pre = obj["trainable_linearlayer"], obj["New_Lan_Embed"]
        w0, q = lin["fc.0.weight"], pre["prompt_query"]
        return VcpDims(int(w0.shape[1]), int(w0.shape[0]), int(obj["prompt_proj.weight"].shape[0]),
                       len([k for k in lin if k.endswith(".weight")]), int(obj["deep_prompt_embeddings"].shape[0]) + 1,
                       int(q.shape[1]), int(obj["prompt_embeddings"].shape[1]))
    except (KeyError, TypeError, IndexError, AttributeError) as err:
        raise ValueError(f"vcp_clip checkpoint {path}: missing or malformed entry {err}") from None


def load_vcp_checkpoint(path: str | Path, backbone=None, heads: int = 8) -> VcpModel:
    """A :class:`VcpModel` from a checkpoint (ours or the official file): every key and shape checked against
    the backbone (or, without one, against the file's own dimensions); errors name the file and key."""
    from ..checkpoints import load_weights_only

    path = Path(path)
    obj = load_weights_only(path, "vcp_clip checkpoint")
    if not isinstance(obj, dict):
        raise ValueError(f"vcp_clip checkpoint {path}: a {type(obj).__name__}, not a dict")
    for g in GROUPS:
        if not isinstance(obj.get(g), dict):
            raise ValueError(f"vcp_clip checkpoint {path}: no {g!r} state dict (top-level keys: {sorted(obj)[:12]})")
    meta = obj.get("meta")
    if isinstance(meta, dict) and "heads" in meta and int(meta["heads"]) != int(heads):
        raise ValueError(f"vcp_clip checkpoint {path}: trained with {meta['heads']} Post-VCP heads, option heads is "
                         f"{heads}")
    file_dims = _dims_of(path, obj)
    dims = file_dims if backbone is None else VcpDims.of_backbone(backbone, file_dims.class_tokens,
                                                                 file_dims.prompt_tokens)
    with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the global RNG
        model = VcpModel(dims, heads)
    expected = model.state_official()
    for key, ref in expected.items():
        got = obj.get(key)
        if isinstance(ref, dict):
            extra, missing = sorted(set(got) - set(ref)), sorted(set(ref) - set(got))
            if extra or missing:
                raise ValueError(f"vcp_clip checkpoint {path}: {key!r} has unexpected keys {extra} / lacks {missing} "
                                 f"(the backbone has {dims.n_layers} layers)")
            for k, v in ref.items():
                if not torch.is_tensor(got[k]) or tuple(got[k].shape) != tuple(v.shape):
                    shape = tuple(got[k].shape) if torch.is_tensor(got[k]) else type(got[k]).__name__
                    raise ValueError(f"vcp_clip checkpoint {path}: {key}.{k} has shape {shape}, expected "
                                     f"{tuple(v.shape)} (backbone width {dims.width}, embed {dims.embed})")
        elif not torch.is_tensor(got) or tuple(got.shape) != tuple(ref.shape):
            shape = tuple(got.shape) if torch.is_tensor(got) else got
            raise ValueError(f"vcp_clip checkpoint {path}: {key!r} is {shape}, expected shape {tuple(ref.shape)} "
                             f"(text width {dims.text_width}, {dims.text_blocks} text blocks)")
    model.linear.load_state_dict({k: v.float() for k, v in obj["trainable_linearlayer"].items()})
    model.pre.load_state_dict({k: v.float() for k, v in obj["New_Lan_Embed"].items()})
    model.post.load_state_dict({k: v.float() for k, v in obj["Zero_try"].items()})
    model.prompts.load_state_dict({k: obj[k].float() for k in TOP_LEVEL})
    return model.eval().requires_grad_(False)


class VcpClipBackend:
    """VCP-CLIP zero-shot maps and scores as a :class:`~anorefiner.zsad.Backend` (from the feature cache)."""

    def __init__(self, config: VcpClipConfig | None = None, backbone=None, name: str = "vcp_clip", seed: int = 0):
        self.config = c = config or VcpClipConfig()
        self.backbone, self.name, self.seed = backbone, name, int(seed)
        if backbone is None or not hasattr(backbone, "image_embedding") or not hasattr(backbone, "model"):
            raise ValueError("vcp_clip needs the CLIP backbone (text tower and image embedding): pass --backbone")
        if not c.checkpoint:
            raise ValueError("vcp_clip needs option 'checkpoint' (rule train_backend, or an official file)")
        if not 0 <= c.alpha <= 1 or c.sigma < 0 or c.topk < 1 or c.batch_size < 1:
            raise ValueError(f"vcp_clip: bad options alpha={c.alpha} (0..1), sigma={c.sigma} (>=0), topk={c.topk} "
                             f"(>=1), batch_size={c.batch_size} (>=1)")
        # the text tower runs on the backbone's device, so the trainable parts live there too
        self.device = getattr(backbone, "device", None) or _resolve_device(c.device)
        self.model = load_vcp_checkpoint(c.checkpoint, backbone, c.heads).to(self.device)
        self.tokens = slot_tokens(backbone, [[c.normal_prompt], [c.abnormal_prompt]])
        self.map_size = int(c.map_size or backbone.resolution)
        self.topk = effective_topk(c.topk, self.map_size ** 2, c.topk_reference)
        self._stack: tuple | None = None  # (feature ids, min, max) of the last category's class stack
        self.last_info = {"map_level": MAP_LEVEL, "map_size": self.map_size, "checkpoint": str(c.checkpoint),
                          "class_minmax": bool(c.class_minmax), "topk": self.topk, "alpha": c.alpha,
                          "sigma": c.sigma}

    def _maps(self, layers: dict, cls) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Smoothed token-grid maps (before the class min-max), scores, and the full-size min / max."""
        names = list(self.backbone.layers)
        missing = [n for n in names if n not in layers]
        if missing:
            raise ValueError(f"vcp_clip: layers {missing} not in the features (have {list(layers)})")
        if cls is None:
            raise ValueError("vcp_clip: no class token for these features (Pre-VCP needs the global embedding)")
        n, h, w, _ = layers[names[0]].shape
        if n == 0:
            raise ValueError("vcp_clip: no images to score (empty category)")
        cls = float_tensor(cls)
        maps, scores, lo, hi = [], [], np.inf, -np.inf
        for a in range(0, n, self.config.batch_size):
            toks = [float_tensor(layers[k][a : a + self.config.batch_size]).reshape(-1, h * w, layers[k].shape[-1])
                    .to(self.device) for k in names]
            with torch.no_grad():
                g = self.backbone.image_embedding(cls[a : a + self.config.batch_size], normalize=False).float()
                text = self.model.text(self.backbone, self.tokens, g.to(self.device))
                raw, new = branch_maps(*self.model.layer_logits(toks, text, (h, w)), self.map_size)
                scores.append(image_scores(raw, new, self.topk).cpu().numpy())
            sm = smooth(raw.cpu().numpy(), new.cpu().numpy(), self.config.alpha, self.config.sigma,
                        self.config.truncate)
            lo, hi = min(lo, float(sm.min())), max(hi, float(sm.max()))
            maps.append(patch_map(torch.from_numpy(sm), (h, w)).numpy())
        return np.concatenate(maps), np.concatenate(scores), lo, hi

    def coarse(self, feats):
        from .. import CoarseResult

        if feats.cls is None:
            raise ValueError("vcp_clip: the feature cache has no class token (a CLIP ViT cache is needed)")
        maps, scores, lo, hi = self._maps(feats.layers, feats.cls)
        self._stack = (tuple(np.asarray(feats.ids).tolist()), lo, hi)
        if self.config.class_minmax:
            maps = class_minmax(maps, lo, hi)
        self.last_info.update({"stack_min": lo, "stack_max": hi, "n_images": int(len(maps))})
        LOG.info("vcp_clip: %d maps %s (%s, class min-max %s)", len(maps), tuple(maps.shape[1:]), MAP_LEVEL,
                 self.config.class_minmax)
        return CoarseResult(maps=maps.astype(np.float32), scores=scores.astype(np.float32))

    def score_queries(self, query_layers, query_cls, feats, reference_idx, exclude):
        """Per-image maps of PGT's pseudo-anomalies (their own class tokens drive Pre-VCP); the references play
        no role. With ``class_minmax`` the maps are scaled with the min / max of the category's own coarse
        maps (``feats``), computed here when :meth:`coarse` has not run on these features, so they are on the
        same scale as the coarse maps (values may leave [0, 1])."""
        maps, _, _, _ = self._maps(query_layers, query_cls)
        if self.config.class_minmax:
            ids = tuple(np.asarray(feats.ids).tolist())
            if self._stack is None or self._stack[0] != ids:
                if feats.cls is None:
                    raise ValueError("vcp_clip: the feature cache has no class token (a CLIP ViT cache is needed)")
                _, _, lo, hi = self._maps(feats.layers, feats.cls)
                self._stack = (ids, lo, hi)
            maps = class_minmax(maps, self._stack[1], self._stack[2])
        return torch.as_tensor(maps.astype(np.float32))
