"""AA-CLIP's residual adapters and its three CLIP forwards (``Mwxinnn/AA-CLIP@53db195``).

* Adapters (``model/adapter_modules.py``, ``model/adapter.py`` l.27-53): ``SimpleAdapter`` = bias-free
  ``Linear`` + ``LeakyReLU`` (slope 0.01); ``SimpleProj`` = bias-free ``Linear`` (+ ``LeakyReLU`` when ``relu``).
  ``image_adapter``: one ``SimpleAdapter(width, width)`` after each of the first ``image_adapt_until`` = 6 visual
  blocks, one ``SimpleProj(width, embed)`` per map level (``seg_proj``) and ``det_proj``; ``text_adapter``: one
  ``SimpleAdapter`` after each of the first ``text_adapt_until`` = 3 text blocks and a final ``SimpleProj(relu=True)``
  that *replaces* CLIP's text projection. Xavier-uniform weights. The official runs pass ``--relu`` never, so
  ``seg_proj`` / ``det_proj`` are plain linear maps (the state-dict keys say which: ``fc.weight`` vs ``fc.0.weight``).
* Residual blend after an adapted block (``adapter.py`` l.92-99, l.129-136): ``a = adapter(x)`` rescaled to the
  token's norm, ``x = w * a * |x| / |a| + (1 - w) * x``, ``w`` = 0.1 in both towers.
* Adapted text forward (``adapter.py`` l.114-145): CLIP's text blocks with the blend, ``ln_final``, the EOT token,
  then ``text_adapter[-1]`` (no ``text_projection``).
* Adapted visual forward (``adapter.py`` l.67-112): the plain blocks with the blend after the first 6, patch tokens
  of the map levels (6/12/18/24) after the blend, ``ln_post``, ``seg_proj`` and L2 norm per level; the detection
  feature is the patch mean of the L2-normalised ``det_proj(ln_post(last level))`` (not renormalised).
* "Surgery" forward of the text stage (``train.py`` l.235-243, ``model/transformer.py`` l.406-425 and l.102-152):
  ``DAPM_replace(20)`` swaps the attention of the last 19 blocks (6-24) for a v-v attention (q = k = v, scale
  head_dim^-0.5) whose output replaces the block's attention (the q-k result is computed and dropped); the FFN
  stays. The official blocks hand it the *sequence-first* stream ``[L, N, C]`` while ``Attention.forward`` reads
  its first axis as the batch, so each token position attends over the *images of the batch* (option
  ``surgery_axis: batch``, the official behaviour; ``tokens`` is CLIP Surgery's intended attention over tokens).

The CLIP weights stay frozen; gradients flow into the adapters only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..anomalyclip.dpam import vv_attention

#: ``train.py`` --surgery_until_layer 20: ``DAPM_replace`` gives the last 19 of 24 blocks the v-v attention.
SURGERY_LAYER = 20
SURGERY_AXES = ("batch", "tokens")


class SimpleAdapter(torch.nn.Module):
    """``adapter_modules.py`` SimpleAdapter: ``LeakyReLU(W x)``, no bias."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.fc = torch.nn.Sequential(torch.nn.Linear(c_in, c_out, bias=False), torch.nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class SimpleProj(torch.nn.Module):
    """``adapter_modules.py`` SimpleProj: ``W x`` (``LeakyReLU(W x)`` with ``relu``), no bias."""

    def __init__(self, c_in: int, c_out: int, relu: bool = True):
        super().__init__()
        linear = torch.nn.Linear(c_in, c_out, bias=False)
        self.fc = torch.nn.Sequential(linear, torch.nn.LeakyReLU()) if relu else linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Adapters(torch.nn.Module):
    """The trainable parts under the official names (``image_adapter``, ``text_adapter`` of ``AdaptedCLIP``)."""

    def __init__(self, width: int, text_width: int, embed: int, n_levels: int, image_until: int = 6,
                 text_until: int = 3, relu: bool = False):
        super().__init__()
        self.image_adapter = torch.nn.ModuleDict({
            "layer_adapters": torch.nn.ModuleList([SimpleAdapter(width, width) for _ in range(image_until)]),
            "seg_proj": torch.nn.ModuleList([SimpleProj(width, embed, relu) for _ in range(n_levels)]),
            "det_proj": SimpleProj(width, embed, relu),
        })
        self.text_adapter = torch.nn.ModuleList([SimpleAdapter(text_width, text_width) for _ in range(text_until)]
                                                + [SimpleProj(text_width, embed, relu=True)])
        for p in [*self.image_adapter.parameters(), *self.text_adapter.parameters()]:  # _init_weights_
            if p.dim() > 1:
                torch.nn.init.xavier_uniform_(p)

    @property
    def image_until(self) -> int:
        return len(self.image_adapter["layer_adapters"])

    @property
    def text_until(self) -> int:
        return len(self.text_adapter) - 1


def dims_of(backbone) -> tuple[int, int, int]:
    """``(vision width, text width, joint embedding width)`` of a CLIP backbone."""
    m = backbone.model
    proj = m.text_projection
    embed = proj.out_features if isinstance(proj, torch.nn.Linear) else int(proj.shape[1])
    return int(backbone.width), int(m.token_embedding.weight.shape[1]), int(embed)


def default_until(n_blocks: int, official: int, official_depth: int) -> int:
    """An adapter count for a tower of ``n_blocks``: the official one on the official depth (6 of 24 visual,
    3 of 12 text blocks), else the same share (at least 1); only the official depth's value is the paper's."""
    return official if n_blocks == official_depth else max(1, round(n_blocks * official / official_depth))


def blend(x: torch.Tensor, adapted: torch.Tensor, weight: float) -> torch.Tensor:
    """``w * a * |x| / |a| + (1 - w) * x`` per token (norms over the channels)."""
    adapted = adapted * x.norm(dim=-1, keepdim=True) / adapted.norm(dim=-1, keepdim=True)
    return weight * adapted + (1 - weight) * x


def _block(transformer, block, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """One open_clip block on a batch-first ``[N, L, D]`` stream, whatever the tower's layout."""
    if getattr(transformer, "batch_first", True):
        return block(x, attn_mask=attn_mask)
    return block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)


def encode_text(backbone, adapters: Adapters, tokens: torch.Tensor, weight: float = 0.1) -> torch.Tensor:
    """``AdaptedCLIP.encode_text``: ``[T, L]`` token ids -> ``[T, embed]`` (not normalised), with gradients."""
    model = backbone.model
    cast = model.transformer.get_cast_dtype()
    tokens = tokens.to(backbone.device)
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)
    mask = model.attn_mask.to(x.device) if model.attn_mask is not None else None
    for i, block in enumerate(model.transformer.resblocks):
        x = _block(model.transformer, block, x, mask)
        if i < adapters.text_until:
            x = blend(x, adapters.text_adapter[i](x), weight)
    x = model.ln_final(x)
    return adapters.text_adapter[-1](x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)])


def class_text(backbone, adapters: Adapters, class_name: str, weight: float = 0.1, real_names: bool = True
               ) -> torch.Tensor:
    """``get_adapted_single_class_text_embedding``: ``[2, embed]`` (normal, abnormal); per state group the
    sentence embeddings are L2-normalised, averaged and L2-normalised again."""
    from ...backbones.clip_prompting import tokenize
    from .prompts import sentences

    normal, abnormal = sentences(class_name, real_names)
    emb = F.normalize(encode_text(backbone, adapters, tokenize(backbone, normal + abnormal), weight), dim=-1)
    return torch.stack([F.normalize(emb[: len(normal)].mean(0), dim=-1),
                        F.normalize(emb[len(normal):].mean(0), dim=-1)])


def adapted_visual(backbone, adapters: Adapters, batch: torch.Tensor, levels: list[int], weight: float = 0.1
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``AdaptedCLIP.forward``: ``([B, h*w, embed]`` L2-normalised tokens per level, ``[B, embed]`` detection
    feature), with gradients into the image adapters."""
    v = backbone.visual
    if len(levels) != len(adapters.image_adapter["seg_proj"]):
        raise ValueError(f"aa_clip: {len(levels)} map levels {levels} for "
                         f"{len(adapters.image_adapter['seg_proj'])} seg_proj heads in the checkpoint")
    x = v.ln_pre(v.patch_dropout(backbone.embed(batch)))
    wanted, tokens = set(levels), []
    for i, block in enumerate(backbone.blocks):
        x = _block(v.transformer, block, x)
        if i < adapters.image_until:
            x = blend(x, adapters.image_adapter["layer_adapters"][i](x), weight)
        if i + 1 in wanted:
            tokens.append(x[:, 1:])
    tokens = [v.ln_post(t) for t in tokens]
    seg = [F.normalize(p(t), dim=-1) for p, t in zip(adapters.image_adapter["seg_proj"], tokens)]
    det = F.normalize(adapters.image_adapter["det_proj"](tokens[-1]), dim=-1).mean(1)
    return seg, det


def surgery_start(n_blocks: int, surgery_layer: int | None = None) -> int:
    """First 1-indexed block with the v-v attention: ``DAPM_replace(L)`` replaces the last ``L - 1`` blocks (the
    official L = 20 of 24 gives block 6; other depths keep its share, as AnomalyCLIP's DPAM)."""
    from ..anomalyclip.dpam import default_dpam_layer

    layer = default_dpam_layer(n_blocks) if surgery_layer is None else int(surgery_layer)
    if not 1 <= layer <= n_blocks + 1:
        raise ValueError(f"aa_clip option surgery_layer={layer} must lie in 1..{n_blocks + 1} (it replaces the "
                         f"last surgery_layer - 1 of the backbone's {n_blocks} blocks)")
    return n_blocks - (layer - 1) + 1


def surgery_attention(block, x: torch.Tensor, axis: str = "batch") -> torch.Tensor:
    """The replaced attention on the ``ln_1``-normed ``[N, L, C]`` stream: v-v attention over the images at each
    token position (``axis="batch"``, the official layout quirk) or over the tokens of each image."""
    if axis == "batch":
        return vv_attention(block, x.transpose(0, 1)).transpose(0, 1)
    if axis == "tokens":
        return vv_attention(block, x)
    raise ValueError(f"aa_clip option surgery_axis must be one of {SURGERY_AXES}, got {axis!r}")


def surgery_tokens(backbone, batch: torch.Tensor, level: int, start: int, axis: str = "batch") -> torch.Tensor:
    """The surgery tower's stream ``[N, L, C]`` after block ``level`` (1-indexed); blocks from ``start`` on use
    :func:`surgery_attention` in place of their attention, then their FFN."""
    v = backbone.visual
    x = v.ln_pre(v.patch_dropout(backbone.embed(batch)))
    for i, block in enumerate(backbone.blocks, start=1):
        if i >= start:
            ls_1, ls_2 = getattr(block, "ls_1", torch.nn.Identity()), getattr(block, "ls_2", torch.nn.Identity())
            x = x + ls_1(surgery_attention(block, block.ln_1(x), axis))
            x = x + ls_2(block.mlp(block.ln_2(x)))
        else:
            x = _block(v.transformer, block, x)
        if i == level:
            return x
    raise ValueError(f"aa_clip: level {level} is not a block of the backbone (1..{len(backbone.blocks)})")


def text_stage_features(backbone, batch: torch.Tensor, level: int, start: int, axis: str = "batch") -> torch.Tensor:
    """``train.py`` l.74-85: ``L2(ln_post(surgery patch tokens) @ proj) + L2(ln_post(CLS) @ proj)`` ``[N, h*w, D]``
    (the CLS of the plain tower; the sum is not renormalised)."""
    v = backbone.visual
    with torch.no_grad():
        tok = v.ln_post(surgery_tokens(backbone, batch, level, start, axis)[:, 1:])
        tok = F.normalize(tok @ v.proj.to(tok.dtype), dim=-1)
        _, cls = backbone.forward(batch)
        return tok + backbone.image_embedding(cls, normalize=True).to(tok.dtype)[:, None]
