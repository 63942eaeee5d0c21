"""Bayes-PFL's text side (``xiaozhen228/Bayes-PFL@8f155a0`` ``models/VPB.py`` class_mapping, prompt_names,
TextEncoder, forward_ensemble).

* The class sentence is ``"X " + name.lower()``, the name mapped for a few classes (``class_mapping``: macaroni1/2
  -> "macaroni", pcb1-4 -> "printed circuit board", pipe_fryum -> "pipe fryum", chewinggum -> "chewing gum",
  metal_nut -> "metal nut"; other names verbatim).
* The token "X" (position 1) is replaced by the ``P + Q`` prompt vectors of each of the B bank prompts, the context
  part shifted by the image-specific flow sample and the state part by the image-agnostic one; the tokens after
  "X" follow, cut to CLIP's 77 positions. CLIP's text tower (causal mask, ``ln_final``, ``text_projection``) reads
  the end-of-text token at its shifted position ``eot + P + Q - 1``.
* Text embeddings ``[n, 2B, D]`` (normal prompts, then abnormal) are L2-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLASS_MAPPING = {"macaroni1": "macaroni", "macaroni2": "macaroni", "pcb1": "printed circuit board",
                 "pcb2": "printed circuit board", "pcb3": "printed circuit board", "pcb4": "printed circuit board",
                 "pipe_fryum": "pipe fryum", "chewinggum": "chewing gum", "metal_nut": "metal nut"}


def class_sentence(class_name: str) -> str:
    """``prompt_names``: ``"X <name>"``, lower case."""
    if not class_name:
        raise ValueError("bayes_pfl: empty class name (the coarse stage passes the category as option class_name)")
    return "X " + CLASS_MAPPING.get(class_name, class_name).lower()


def class_tokens(backbone, class_names: list[str]) -> torch.Tensor:
    """Token ids ``[n, context]`` of the class sentences."""
    from ...backbones.clip_prompting import tokenize

    return tokenize(backbone, [class_sentence(n) for n in class_names])


def prompted_text(backbone, tokens: torch.Tensor, bank: torch.Tensor, context_bias: torch.Tensor,
                  state_bias: torch.Tensor, context_len: int) -> torch.Tensor:
    """``TextEncoder.forward`` for ``n`` rows: ``tokens [n, L]``, ``bank [B, P + Q, W]``, biases ``[n, W]`` added to
    the bank's first ``context_len`` (P) and remaining (Q) vectors -> ``[n, B, D]`` (projected, not normalised)."""
    from ...backbones.clip_prompting import encode_text_embeddings, token_embeddings

    n, length = tokens.shape
    s, m, w = bank.shape
    emb = token_embeddings(backbone, tokens)
    bias = torch.cat([context_bias[:, None].expand(n, context_len, w),
                      state_bias[:, None].expand(n, m - context_len, w)], dim=1)
    prompts = bank[None].to(emb.dtype) + bias[:, None].to(emb.dtype)
    x = torch.cat([emb[:, None, :1].expand(n, s, 1, w), prompts,
                   emb[:, None, 2 : length - m + 1].expand(n, s, length - m - 1, w)], dim=2)
    eot = (tokens.argmax(dim=-1) + m - 1).repeat_interleave(s)
    return encode_text_embeddings(backbone, x.reshape(n * s, length, w), eot).reshape(n, s, -1)


def text_embeddings(model, backbone, tokens: torch.Tensor, image_z: torch.Tensor, normal_z: torch.Tensor,
                    abnormal_z: torch.Tensor) -> torch.Tensor:
    """``forward_ensemble``'s text: ``[n, 2B, D]`` L2-normalised (normal bank prompts, then abnormal), row r built
    from the flow samples ``image_z[r]``, ``normal_z[r]`` and ``abnormal_z[r]`` (each ``[n, D]``)."""
    p = int(model.prompt_context.shape[1])
    normal_bank, abnormal_bank = model.banks()
    normal = prompted_text(backbone, tokens, normal_bank, image_z, normal_z, p)
    abnormal = prompted_text(backbone, tokens, abnormal_bank, image_z, abnormal_z, p)
    return F.normalize(torch.cat([normal, abnormal], dim=1), dim=-1)
