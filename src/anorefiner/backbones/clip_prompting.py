"""CLIP forwards with learned prompts: the text and image towers of a :class:`ClipViT` run block by block,
with hooks where prompt learners insert or overwrite tokens.

The prompt-learning backends (VCP-CLIP's deep text prompts and Pre-VCP class token, AnomalyCLIP's
compound prompts, AdaCLIP's hybrid prompts; specs/backends.md section 2, specs/tta.md Part B) differ only
in *which* tokens they change before *which* block. These functions hold the rest of open_clip's forward
(``CLIP.encode_text``: token embedding + position embedding, the blocks with the causal mask, ``ln_final``,
the end-of-text token, ``text_projection``; the visual tower as :meth:`ClipViT.forward`), so each backend
writes only its hooks. Gradients flow (the CLIP weights stay frozen: :class:`ClipViT` sets
``requires_grad_(False)``), so the prompts can be trained through them.

Hooks receive and return batch-first tensors ``[N, L, D]``; ``block`` is 1-based (block 1 = ``resblocks[0]``).
"""

from __future__ import annotations

from typing import Callable

import torch

BlockHook = Callable[[int, torch.Tensor], torch.Tensor]


def tokenize(backbone, texts: list[str]) -> torch.Tensor:
    """open_clip's tokenizer for the backbone: ``[T, context_length]`` token ids (SOT ... EOT, zero padded)."""
    if isinstance(texts, str) or not texts:
        raise ValueError("tokenize takes a non-empty list of strings")
    if backbone._tokenizer is None:
        backbone._tokenizer = backbone._open_clip.get_tokenizer(backbone.name)
    return backbone._tokenizer(list(texts)).to(backbone.device)


def eot_index(tokens: torch.Tensor) -> torch.Tensor:
    """Position of the end-of-text token of each row: CLIP's argmax pooling (EOT has the largest id)."""
    return tokens.argmax(dim=-1)


def token_embeddings(backbone, tokens: torch.Tensor) -> torch.Tensor:
    """``[T, L] -> [T, L, D]``: the frozen token embedding table, before the position embedding."""
    model = backbone.model
    return model.token_embedding(tokens.to(backbone.device)).to(model.transformer.get_cast_dtype())


def _run_blocks(transformer, x: torch.Tensor, attn_mask, hook: BlockHook | None) -> torch.Tensor:
    batch_first = bool(getattr(transformer, "batch_first", True))
    for i, block in enumerate(transformer.resblocks, start=1):
        if hook is not None:
            x = hook(i, x)
        y = x if batch_first else x.transpose(0, 1)
        y = block(y, attn_mask=attn_mask)
        x = y if batch_first else y.transpose(0, 1)
    return x


def encode_text_embeddings(backbone, x: torch.Tensor, eot: torch.Tensor, *, before_block: BlockHook | None = None,
                           before_final: Callable[[torch.Tensor], torch.Tensor] | None = None,
                           normalize: bool = False) -> torch.Tensor:
    """CLIP's text forward from token embeddings ``x [N, L, D]`` (already holding any prompt tokens).

    Adds the position embedding (the first ``L`` rows), runs the text blocks with the causal mask
    (``before_block(block, x)`` may overwrite tokens first), applies ``before_final`` (e.g. VCP-CLIP's prompt
    LayerNorm, or dropping inserted tokens) then ``ln_final``, takes the token at ``eot [N]`` and projects it.
    Without hooks this equals open_clip's ``encode_text`` of the same tokens.
    """
    model = backbone.model
    n_ctx = x.shape[1]
    if n_ctx > model.positional_embedding.shape[0]:
        raise ValueError(f"text sequence of {n_ctx} tokens exceeds CLIP's context of "
                         f"{model.positional_embedding.shape[0]}")
    x = x + model.positional_embedding[:n_ctx].to(x.dtype)
    mask = model.attn_mask
    if mask is not None:
        mask = mask[:n_ctx, :n_ctx].to(x.device)
    x = _run_blocks(model.transformer, x, mask, before_block)
    if before_final is not None:
        x = before_final(x)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot.to(x.device)]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def visual_forward(backbone, batch: torch.Tensor, *, before_block: BlockHook | None = None,
                   blocks: tuple[int, ...] | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The image tower block by block with gradients: ``({block: [N, L, width]}, last block's output)``.

    ``batch [N, 3, R, R]`` (``backbone.preprocess``) is embedded as :meth:`ClipViT.embed` (class token +
    patches + the interpolated position embedding) and ``ln_pre``; ``before_block(block, x)`` may append or
    overwrite tokens (AdaCLIP's visual prompts). Returned sequences are the full residual stream of the
    ``blocks`` asked for (class token first, any appended tokens last); slicing is the caller's.
    """
    v = backbone.visual
    x = v.ln_pre(v.patch_dropout(backbone.embed(batch)))
    wanted = set(blocks or ())
    out: dict[int, torch.Tensor] = {}

    def hook(i: int, y: torch.Tensor) -> torch.Tensor:
        if i - 1 in wanted:
            out[i - 1] = y
        return before_block(i, y) if before_block is not None else y

    x = _run_blocks(v.transformer, x, None, hook)
    n_blocks = len(v.transformer.resblocks)
    if n_blocks in wanted:
        out[n_blocks] = x
    return out, x
