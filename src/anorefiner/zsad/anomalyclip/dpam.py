"""AnomalyCLIP's dual-path visual forward (DPAM) on the frozen blocks of a :class:`ClipViT`.

Facts (specs/tta.md Part B.1; ``zqhang/AnomalyCLIP@45ed4dd`` ``AnomalyCLIP_lib/AnomalyCLIP.py``: class
``Attention``, ``ResidualAttentionBlock.forward``, ``VisionTransformer.DAPM_replace`` and ``forward``):

* ``DAPM_replace(DPAM_layer)`` gives the last ``DPAM_layer - 1`` blocks a second path (the default 20 of
  ViT-L/14: 1-indexed blocks 6-24). The *original* path runs every block unchanged (q-k attention + FFN).
* The second path starts as a copy of the stream entering the first dual block; each dual block adds to it
  the v-v self-attention of the ORIGINAL path's ``ln_1`` input: per head, q and k are both replaced by v,
  softmax(v v^T * head_dim^-0.5) v, heads merged, the block's ``out_proj``. No FFN on this path (``ffn=False``,
  the official train/test setting; the ``ffn=True`` variant is not ported).
* Patch tokens are read from the second path (with the class token; callers drop it); the global feature
  is the ORIGINAL path's class token of the last block.

The original path is exactly open_clip's block, so :func:`anorefiner.backbones.clip_prompting.visual_forward`
runs it; its ``before_block`` hook sees each block's input (the original path's stream) and accumulates the
second path there. Hooks are batch-first, so open_clip's sequence-first layout needs no special case here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...backbones.clip_prompting import visual_forward

#: ``train.py``/``test.py`` call ``encode_image(..., DPAM_layer=20)``: the last 19 blocks get the dual path.
DEFAULT_DPAM_LAYER = 20


def default_dpam_layer(n_blocks: int) -> int:
    """``DPAM_layer`` for a tower of ``n_blocks``: the official 20 for 24 blocks (ViT-L/14: blocks 1-5 single path,
    6-24 dual); other depths keep the same share, ``round(5/24 * n_blocks)`` single-path blocks (ViT-B/16: 11,
    blocks 3-12; the 4-block test model: 4, blocks 2-4). Only the 24-block value is the paper's."""
    single = int(round(n_blocks * (24 - (DEFAULT_DPAM_LAYER - 1)) / 24))
    return n_blocks - single + 1


def dpam_start(n_blocks: int, dpam_layer: int | None) -> int:
    """First (1-indexed) dual-path block: ``DAPM_replace`` replaces ``resblocks[-1] .. resblocks[-(dpam_layer-1)]``.

    ``dpam_layer = 1`` means no dual path (returns ``n_blocks + 1``); ``None``: :func:`default_dpam_layer`.
    """
    dpam_layer = default_dpam_layer(n_blocks) if dpam_layer is None else int(dpam_layer)
    if dpam_layer < 1 or dpam_layer - 1 > n_blocks:
        raise ValueError(f"anomalyclip option dpam_layer={dpam_layer} must lie in 1..{n_blocks + 1} "
                         f"(it replaces the last dpam_layer - 1 of the backbone's {n_blocks} blocks)")
    return n_blocks - (dpam_layer - 1) + 1


def vv_attention(block, x: torch.Tensor) -> torch.Tensor:
    """The v-v self-attention of an open_clip ``ResidualAttentionBlock`` on ``x`` (already ``ln_1``-normed).

    ``x [N, L, C]`` batch-first -> ``out_proj(concat_h softmax(v_h v_h^T * d_h^-0.5) v_h)`` ``[N, L, C]``,
    using the block's frozen ``in_proj`` (its v part) and ``out_proj``; the class ``Attention`` of the official
    code with the same weights (``scale = head_dim ** -0.5``, q = k = v).
    """
    attn = block.attn
    if not isinstance(attn, torch.nn.MultiheadAttention):
        raise TypeError(f"anomalyclip DPAM needs nn.MultiheadAttention blocks, got {type(attn).__name__}")
    n, length, c = x.shape
    heads = int(attn.num_heads)
    w = attn.in_proj_weight[2 * c :]
    b = attn.in_proj_bias[2 * c :] if attn.in_proj_bias is not None else None
    v = F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
    v = v.reshape(n, length, heads, c // heads).transpose(1, 2)  # [N, H, L, d]
    scale = (c // heads) ** -0.5
    weights = torch.softmax((v @ v.transpose(-2, -1)) * scale, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(n, length, c)
    return attn.out_proj(out)


def dual_path_forward(backbone, batch: torch.Tensor, blocks: tuple[int, ...], dpam_layer: int | None = None
                      ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """``({block: second-path stream [N, L, C]}, original path's last-block stream [N, L, C])``.

    For blocks before the dual path starts the second path is the original stream (the official
    ``out_tokens`` then hold the single path's output). Gradients flow; callers wrap it in ``no_grad``.
    """
    n_blocks = len(backbone.blocks)
    start = dpam_start(n_blocks, dpam_layer)
    wanted = {int(i) for i in blocks}
    bad = sorted(i for i in wanted if not 1 <= i <= n_blocks)
    if bad:
        raise ValueError(f"anomalyclip map layers {bad} are not blocks of the backbone (1..{n_blocks})")
    resblocks = backbone.blocks
    state: dict = {"vv": None}
    vv_out: dict[int, torch.Tensor] = {}

    def hook(i: int, y: torch.Tensor) -> torch.Tensor:  # y: the original path entering block i
        if i >= start:
            blk = resblocks[i - 1]
            base = y if state["vv"] is None else state["vv"]
            ls = getattr(blk, "ls_1", None)
            delta = vv_attention(blk, blk.ln_1(y))
            state["vv"] = base + (ls(delta) if ls is not None else delta)
            if i in wanted:
                vv_out[i] = state["vv"]
        return y

    single = tuple(sorted(i for i in wanted if i < start))
    ori, last = visual_forward(backbone, batch, before_block=hook, blocks=single)
    vv_out.update({i: ori[i] for i in single})
    return {i: vv_out[i] for i in sorted(wanted)}, last


def project_tokens(backbone, stream: torch.Tensor) -> torch.Tensor:
    """``ln_post`` then ``proj`` of every token of ``[N, L, C]``, then L2 norm (``VisionTransformer.forward``)."""
    v = backbone.visual
    x = v.ln_post(stream)
    if v.proj is not None:
        x = x @ v.proj.to(x.dtype)
    return F.normalize(x, dim=-1)


def global_feature(backbone, last: torch.Tensor) -> torch.Tensor:
    """The official quirk: the original path's class token ``@ proj`` WITHOUT ``ln_post`` (L2-normalised)."""
    v = backbone.visual
    cls = last[:, 0]
    if v.proj is not None:
        cls = cls @ v.proj.to(cls.dtype)
    return F.normalize(cls, dim=-1)


#: ``pos_embed`` option values: the official resize, or the backbone's own (bicubic antialiased, backends.md 0.3)
POS_EMBED_MODES = ("bilinear", "backbone")


def with_position_embedding(backbone, mode: str = "bilinear"):
    """The backbone with AnomalyCLIP's position embedding (a shallow copy sharing the frozen model).

    ``"bilinear"``: ``VisionTransformer.forward`` (``AnomalyCLIP.py`` L363-370) resizes the patch part of the
    native position embedding with ``F.interpolate(mode='bilinear')`` (align_corners False, no antialias) to the
    input grid, class position kept; ``"backbone"``: the backbone's own embedding, unchanged.
    """
    if mode not in POS_EMBED_MODES:
        raise ValueError(f"anomalyclip option pos_embed must be one of {POS_EMBED_MODES}, got {mode!r}")
    if mode == "backbone":
        return backbone
    from ...backbones.clip_vit import with_pos_embed

    return with_pos_embed(backbone, "bilinear")
