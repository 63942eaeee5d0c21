"""VCP-CLIP's text side: the ``<|class|>`` slot, Pre-VCP and the deep text prompts (specs/backends.md section 2).

Facts from ``xiaozhen228/VCP-CLIP@4dd96ec`` (specs/backends.md section 2, "Text prompts" and "Text encoder"):

* class-agnostic prompts ``a photo of a good <|class|>`` / ``a photo of a damaged <|class|>`` (one template
  each, ``models/prompt_ensemble.py``); ``<|class|>`` is one extra vocabulary row, replaced anyway;
* Pre-VCP (``models/pre_vcp.py`` Context_Prompting): the un-normalised global image embedding ``g [B, D]``
  -> ``Conv1d(1 -> r, k=3, padding same)`` -> ``[B, r, D]`` + learnable ``prompt_query [1, r, D]``
  (trunc-normal, std 1, +-2); the ``r`` vectors replace the class token, later tokens shift right by
  ``r - 1`` and the sequence is cut to the context length;
* deep text prompts (``models/model_CLIP.py`` encode_text / forward_deep_prompt): after the position
  embedding, ``dropout(prompt_proj(prompt_embeddings))`` is inserted at position 1 and the last token
  dropped; before every later block ``b = 2..n_blocks`` position 1 is overwritten with
  ``dropout(prompt_proj(deep_prompt_embeddings[b - 2]))`` (so there are ``n_blocks - 1`` deep prompts:
  11 for CLIP's 12 text blocks); after the last block position 1 is removed, ``prompt_norm``
  (LayerNorm, eps 1e-6) then ``ln_final``; the end-of-text token sits ``r - 1`` further right;
* per image and state: ``text_projection``, L2 norm, mean over the state's templates, L2 norm -> ``[B, 2, D]``.

The ``<|class|>`` slot is made with open_clip's tokenizer (our choice, no extra vocabulary row): the
template is tokenized without the slot and a placeholder id is spliced in where ``<|class|>`` stood;
its embedding is never used (Pre-VCP replaces it). The transformer forward is
:mod:`anorefiner.backbones.clip_prompting`'s, with hooks for the prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...backbones.clip_prompting import encode_text_embeddings, eot_index, token_embeddings, tokenize

CLASS_SLOT = "<|class|>"
NORMAL_PROMPT = "a photo of a good <|class|>"  # models/prompt_ensemble.py prompt_templates_normal
ABNORMAL_PROMPT = "a photo of a damaged <|class|>"  # models/prompt_ensemble.py prompt_templates_abnormal
PLACEHOLDER_ID = 0  # any id: the slot's embedding is replaced by Pre-VCP
PROMPT_DROPOUT = 0.1  # model_CLIP.py prompt_dropout
TEMPERATURE_INIT = float(np.log(1 / 0.07))  # pre_vcp.py prompt_temp, post_vcp.py prompt_temp_l1


@dataclass
class SlotTokens:
    """Token ids ``[T, L]`` with a placeholder at ``slot [T]``, EOT positions ``eot [T]``, ``state [T]``."""

    ids: torch.Tensor
    slot: torch.Tensor
    eot: torch.Tensor
    state: torch.Tensor


def slot_tokens(backbone, states: list[list[str]]) -> SlotTokens:
    """Tokenize templates (one list per state, each with one ``<|class|>``) and splice in the class slot."""
    ids, slots, eots, st = [], [], [], []
    for s, templates in enumerate(states):
        if not templates:
            raise ValueError(f"vcp_clip: state {s} has no prompt template")
        for text in templates:
            if text.count(CLASS_SLOT) != 1:
                raise ValueError(f"vcp_clip prompt {text!r} must hold {CLASS_SLOT!r} exactly once")
            prefix, suffix = (p.strip() for p in text.split(CLASS_SLOT))
            pre, suf = tokenize(backbone, [prefix or "x", suffix or "x"]).cpu()
            e_pre, e_suf = int(eot_index(pre[None])[0]), int(eot_index(suf[None])[0])
            body = pre[1:e_pre].tolist() if prefix else []
            tail = suf[1:e_suf].tolist() if suffix else []
            seq = [int(pre[0])] + body + [PLACEHOLDER_ID] + tail + [int(pre[e_pre])]
            n_ctx = pre.shape[0]
            if len(seq) > n_ctx:
                raise ValueError(f"vcp_clip prompt {text!r} exceeds CLIP's context of {n_ctx} tokens")
            row = torch.zeros(n_ctx, dtype=pre.dtype)
            row[: len(seq)] = torch.tensor(seq, dtype=pre.dtype)
            ids.append(row)
            slots.append(1 + len(body))
            eots.append(len(seq) - 1)
            st.append(s)
    return SlotTokens(torch.stack(ids), torch.tensor(slots), torch.tensor(eots), torch.tensor(st))


class ClassConv(torch.nn.Module):
    """``pre_vcp.py`` Linear1: ``Conv1d(1, r, 3, padding='same')`` on the global feature (key ``fc``)."""

    def __init__(self, r: int):
        super().__init__()
        self.fc = torch.nn.Conv1d(1, r, 3, stride=1, padding="same")

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.fc(g.unsqueeze(1))


class PreVcp(torch.nn.Module):
    """Pre-VCP (checkpoint group ``New_Lan_Embed``): ``[B, D]`` global feature -> ``[B, r, D]`` class tokens."""

    def __init__(self, dim: int, r: int = 2):
        super().__init__()
        self.prompt_query = torch.nn.Parameter(torch.empty(1, r, dim))
        torch.nn.init.trunc_normal_(self.prompt_query)  # pre_vcp.py: std 1, bounds +-2
        self.prompt_linear1 = ClassConv(r)  # Conv1d default init (pre_vcp.py re-inits only Linear/LayerNorm)
        self.prompt_temp = torch.nn.Parameter(torch.tensor(TEMPERATURE_INIT))  # tau1, raw branch

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.prompt_linear1(g.to(self.prompt_query.dtype)) + self.prompt_query


class TextPrompts(torch.nn.Module):
    """The deep text prompts (top-level checkpoint keys, ``model_CLIP.py`` _init_prompt)."""

    def __init__(self, width: int, embed_dim: int, n_blocks: int, n_tokens: int = 1):
        super().__init__()
        if n_blocks < 2:
            raise ValueError(f"vcp_clip: the text tower has {n_blocks} block(s); deep prompts need at least 2")
        self.prompt_embeddings = torch.nn.Parameter(torch.empty(1, n_tokens, width).uniform_(-1, 1))
        self.deep_prompt_embeddings = torch.nn.Parameter(torch.empty(n_blocks - 1, n_tokens, width).uniform_(-1, 1))
        self.prompt_proj = torch.nn.Linear(width, width)
        torch.nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        self.prompt_norm = torch.nn.LayerNorm(width, eps=1e-6)
        # created, trained and saved by the official code but unused in its forward (kept for the key layout)
        self.prompt_text_projection = torch.nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)
        self.prompt_dropout = torch.nn.Dropout(PROMPT_DROPOUT)
        self.n_tokens = n_tokens

    def project(self, p: torch.Tensor, n: int) -> torch.Tensor:
        return self.prompt_dropout(self.prompt_proj(p)).expand(n, -1, -1)

    def before_block(self, block: int, x: torch.Tensor) -> torch.Tensor:
        n, k = x.shape[0], self.n_tokens
        if block == 1:  # insert after SOT, drop the last tokens (padding)
            return torch.cat([x[:, :1], self.project(self.prompt_embeddings, n).to(x.dtype), x[:, 1:-k]], dim=1)
        deep = self.project(self.deep_prompt_embeddings[block - 2 : block - 1].squeeze(0), n).to(x.dtype)
        return torch.cat([x[:, :1], deep, x[:, 1 + k :]], dim=1)

    def before_final(self, x: torch.Tensor) -> torch.Tensor:
        return self.prompt_norm(torch.cat([x[:, :1], x[:, 1 + self.n_tokens :]], dim=1))


def splice(emb: torch.Tensor, tokens: SlotTokens, class_feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings ``[T, L, W]`` + class tokens ``[B, r, W]`` -> ``[B*T, L, W]`` and EOT ``[B*T]``.

    Per image ``b`` and template ``t``: ``emb[t, :slot]``, the ``r`` class tokens, ``emb[t, slot+1 : L-r+1]``.
    """
    b, r = class_feature.shape[:2]
    n_ctx = emb.shape[1]
    rows = []
    for t in range(emb.shape[0]):
        s = int(tokens.slot[t])
        rows.append(torch.cat([emb[t, :s].expand(b, -1, -1), class_feature.to(emb.dtype),
                               emb[t, s + 1 : n_ctx - r + 1].expand(b, -1, -1)], dim=1))
    x = torch.stack(rows, dim=1).reshape(b * emb.shape[0], n_ctx, emb.shape[-1])
    eot = (tokens.eot + r - 1).repeat(b)
    if int(eot.max()) >= n_ctx:
        raise ValueError(f"vcp_clip: the prompt with {r} class tokens exceeds CLIP's context of {n_ctx}")
    return x, eot


def vcp_text(backbone, tokens: SlotTokens, class_feature: torch.Tensor, prompts: TextPrompts | None) -> torch.Tensor:
    """Per-image text embeddings ``[B, n_states, D]`` (row 0 normal, row 1 abnormal), L2-normalised.

    ``prompts=None`` runs CLIP's plain text forward on the spliced sequence (no deep prompts, no prompt norm).
    """
    emb = token_embeddings(backbone, tokens.ids)
    x, eot = splice(emb, tokens, class_feature)
    if prompts is None:
        out = encode_text_embeddings(backbone, x, eot)
    else:
        out = encode_text_embeddings(backbone, x, eot, before_block=prompts.before_block,
                                     before_final=prompts.before_final)
    b, n_t = class_feature.shape[0], tokens.ids.shape[0]
    out = F.normalize(out.float(), dim=-1).reshape(b, n_t, -1)
    states = int(tokens.state.max()) + 1
    per_state = [out[:, (tokens.state == s).to(out.device)].mean(1) for s in range(states)]
    return F.normalize(torch.stack(per_state, dim=1), dim=-1)
