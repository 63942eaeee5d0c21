"""AdaCLIP's learnable parts (hybrid prompts + projection heads) and the prompted CLIP forwards.

Facts from ``caoyunkang/AdaCLIP@e27ee32`` (specs/tta.md Part B.2; ``method/adaclip.py`` PromptLayer,
ProjectLayer, AdaCLIP.encode_image / encode_text / generate_and_set_dynamic_promtps), prompting type "SD"
(static + dynamic), branch "VL" (visual + text), depth J, length L:

* static prompts ``J x [L, width]`` per tower, N(0, 0.02);
* dynamic prompts from the frozen pooled image feature g (``ln_post(CLS) @ proj`` of a prompt-free pass,
  no gradient): ``L x Linear(embed -> visual width)`` and ``L x Linear(embed -> text width)``, stacked to
  ``[B, L, width]``; the prompt of block j (0-based, j < J) is dynamic + static_j;
* visual tower: before block 1 the L prompt tokens are APPENDED after the patch tokens; before blocks
  2..J the last L tokens are replaced; exported tokens never include them;
* text tower: block 1 gets no prompt (static_0 is unused); before blocks 2..J the positions 1..L (after
  the start token) are overwritten;
* ``patch_token_layer``: one ``Linear(visual width -> embed)`` per output layer on raw patch tokens (class
  token dropped, no ``ln_post``); ``cls_token_layer``: ``Linear(embed -> embed)`` on the pooled feature
  (``ln_post(CLS) @ proj``) of the prompted forward, as ``AdaCLIP.extract_feat`` (option ``cls_input`` of
  :mod:`.adaclip`); both L2-normalised;
* precision: the official ``PromptLayer`` casts every prompt to fp16 (``.half()``, ``method/adaclip.py`` l.87,
  118, 123) before concatenating it with the fp32 token sequence, with or without autocast, so the prompts
  enter the blocks rounded to fp16 (``precision="float16"``, the default); ``"float32"`` keeps them exact.

Parameter names follow the official module tree so checkpoints carry the official keys
(``clip_model.`` + the names below). The CLIP forwards reuse :mod:`anorefiner.backbones.clip_prompting`:
its ``visual_forward`` hook may return a longer sequence, so appending needs no extension.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ...backbones.clip_prompting import encode_text_embeddings, eot_index, token_embeddings, tokenize, visual_forward

#: the official checkpoint's key prefix (``AdaCLIP_Trainer.clip_model``)
KEY_PREFIX = "clip_model."
#: the names of the learnable parts (``AdaCLIP_Trainer.learnable_paramter_list``)
LEARNABLE = ("text_prompter", "visual_prompter", "patch_token_layer", "cls_token_layer",
             "dynamic_visual_prompt_generator", "dynamic_text_prompt_generator")


#: prompt precisions: the official fp16 rounding (default) or none
PROMPT_PRECISIONS = ("float16", "float32")


def _check_precision(precision: str) -> None:
    if precision not in PROMPT_PRECISIONS:
        raise ValueError(f"adaclip prompt precision must be one of {PROMPT_PRECISIONS}, got {precision!r}")


def _entering(p: torch.Tensor, y: torch.Tensor, precision: str) -> torch.Tensor:
    """The prompt as it enters the sequence ``y``: ``.half()`` first for ``"float16"``, then ``y``'s dtype
    (the official ``torch.cat`` promotes the fp16 prompt back to the sequence's dtype)."""
    return (p.half() if precision == "float16" else p).to(y.dtype)


class _Prompter(torch.nn.Module):
    """``PromptLayer``'s parameters: ``depth`` static prompts ``[length, width]``, N(0, 0.02)."""

    def __init__(self, width: int, length: int, depth: int):
        super().__init__()
        self.static_prompts = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.empty(length, width)) for _ in range(depth)])
        for p in self.static_prompts:
            torch.nn.init.normal_(p, std=0.02)


class _Heads(torch.nn.Module):
    """``ProjectLayer``: ``n`` independent ``Linear(din, dout)`` (default init), attribute ``head``."""

    def __init__(self, din: int, dout: int, n: int):
        super().__init__()
        self.head = torch.nn.ModuleList([torch.nn.Linear(din, dout) for _ in range(n)])


def backbone_dims(backbone) -> dict:
    """Widths read from the CLIP model (never hard-coded): visual width, text width, joint embedding."""
    model = backbone.model
    return {"visual": int(backbone.width), "text": int(model.token_embedding.weight.shape[1]),
            "embed": int(backbone.visual.proj.shape[1]), "layers": len(backbone.layers)}


class AdaClipModel(torch.nn.Module):
    """The learnable parts, created in the official order (so one seed gives one initialisation)."""

    def __init__(self, visual: int, text: int, embed: int, layers: int, length: int = 5, depth: int = 4):
        super().__init__()
        if length < 1 or depth < 1 or layers < 1:
            raise ValueError(f"adaclip: prompt length {length}, depth {depth} and layers {layers} must be >= 1")
        self.length, self.depth = int(length), int(depth)
        self.text_prompter = _Prompter(text, length, depth)
        self.visual_prompter = _Prompter(visual, length, depth)
        self.patch_token_layer = _Heads(visual, embed, layers)
        self.cls_token_layer = _Heads(embed, embed, 1)
        self.dynamic_visual_prompt_generator = _Heads(embed, visual, length)
        self.dynamic_text_prompt_generator = _Heads(embed, text, length)

    @classmethod
    def for_backbone(cls, backbone, length: int = 5, depth: int = 4) -> "AdaClipModel":
        d = backbone_dims(backbone)
        return cls(d["visual"], d["text"], d["embed"], d["layers"], length, depth)

    def dynamic_prompts(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen pooled feature ``g [B, E]`` -> (visual ``[B, L, Wv]``, text ``[B, L, Wt]``) dynamic prompts."""
        vis = torch.stack([h(g) for h in self.dynamic_visual_prompt_generator.head], dim=1)
        txt = torch.stack([h(g) for h in self.dynamic_text_prompt_generator.head], dim=1)
        return vis, txt

    def patch_features(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Raw patch tokens ``[B, P, Wv]`` per output layer -> L2-normalised ``[B, P, E]``."""
        if len(tokens) != len(self.patch_token_layer.head):
            raise ValueError(f"adaclip: {len(tokens)} token layers for {len(self.patch_token_layer.head)} heads")
        return [F.normalize(h(t), dim=-1) for h, t in zip(self.patch_token_layer.head, tokens)]

    def cls_feature(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.cls_token_layer.head[0](pooled), dim=-1)


def frozen_pooled(backbone, x: torch.Tensor) -> torch.Tensor:
    """g: ``ln_post(CLS) @ proj`` of the prompt-free forward, without gradient (not normalised)."""
    with torch.no_grad():
        _, cls = backbone.forward(x)
        return backbone.image_embedding(cls, normalize=False).float()


def visual_prompt_hook(static: list[torch.Tensor], dynamic: torch.Tensor, length: int, precision: str = "float16"):
    """``before_block`` hook: append (block 1) or replace (blocks 2..J) the last ``length`` tokens."""
    _check_precision(precision)

    def hook(block: int, y: torch.Tensor) -> torch.Tensor:
        j = block - 1
        if j >= len(static):
            return y
        p = _entering(dynamic + static[j], y, precision)
        return torch.cat([y, p], 1) if j == 0 else torch.cat([y[:, : y.shape[1] - length], p], 1)
    return hook


def text_prompt_hook(static: list[torch.Tensor], dynamic: torch.Tensor, length: int, precision: str = "float16"):
    """``before_block`` hook: overwrite positions 1..L before blocks 2..J (``dynamic``: ``[S, L, Wt]``)."""
    _check_precision(precision)

    def hook(block: int, y: torch.Tensor) -> torch.Tensor:
        j = block - 1
        if j == 0 or j >= len(static):
            return y
        p = _entering(dynamic + static[j], y, precision)
        return torch.cat([y[:, :1], p, y[:, 1 + length:]], 1)
    return hook


def prompted_visual(backbone, model: AdaClipModel, x: torch.Tensor, dyn_vis: torch.Tensor,
                    precision: str = "float16"):
    """Prompted image tower: (raw patch tokens ``[B, P, Wv]`` per output layer, pooled ``[B, E]``)."""
    blocks = tuple(int(k) for k in backbone.layers)
    static = list(model.visual_prompter.static_prompts)
    hook = visual_prompt_hook(static, dyn_vis, model.length, precision)
    seqs, last = visual_forward(backbone, x, before_block=hook, blocks=blocks)
    n_len = model.length
    tokens = [seqs[b][:, 1 : seqs[b].shape[1] - n_len] for b in blocks]
    v = backbone.visual
    pooled = v.ln_post(last[:, 0]) @ v.proj
    return tokens, pooled


class SentenceBank:
    """The tokenised sentences of one class (normal first), encoded per image with the text prompts."""

    def __init__(self, backbone, normal: list[str], abnormal: list[str]):
        self.n_normal, self.n = len(normal), len(normal) + len(abnormal)
        self.tokens = tokenize(backbone, normal + abnormal)
        self.eot = eot_index(self.tokens)
        with torch.no_grad():
            self.embedded = token_embeddings(backbone, self.tokens)


def prompted_text(backbone, model: AdaClipModel, bank: SentenceBank, dyn_txt: torch.Tensor,
                  precision: str = "float16") -> torch.Tensor:
    """Per image ``b``: encode every sentence with the text prompts of ``dyn_txt[b]``; per state group the
    mean of the normalised embeddings, normalised (``TextEmbebddingLayer.encode_text``) -> ``[B, 2, E]``."""
    b, s = dyn_txt.shape[0], bank.n
    x = bank.embedded.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * s, *bank.embedded.shape[1:])
    dyn = dyn_txt.repeat_interleave(s, dim=0)
    hook = text_prompt_hook(list(model.text_prompter.static_prompts), dyn, model.length, precision)
    emb = encode_text_embeddings(backbone, x, bank.eot.repeat(b), before_block=hook)
    emb = F.normalize(emb.float(), dim=-1).reshape(b, s, -1)
    groups = [emb[:, : bank.n_normal].mean(1), emb[:, bank.n_normal:].mean(1)]
    return F.normalize(torch.stack(groups, 1), dim=-1)


# ------------------------------------------------------------------ checkpoints
def state_for_checkpoint(model: AdaClipModel) -> dict:
    """Official keys (``clip_model.`` prefix), plain CPU tensors."""
    return {KEY_PREFIX + k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def expected_shapes(model: AdaClipModel) -> dict:
    return {KEY_PREFIX + k: tuple(v.shape) for k, v in model.state_dict().items()}


def _infer(state: dict, path: Path) -> AdaClipModel:
    """The model whose shapes the checkpoint's keys imply (the official files carry no meta)."""
    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    need = [f"{KEY_PREFIX}{n}.{s}" for n, s in (("visual_prompter", "static_prompts.0"),
                                                ("text_prompter", "static_prompts.0"),
                                                ("patch_token_layer", "head.0.weight"),
                                                ("cls_token_layer", "head.0.weight"))]
    for k in need:
        if k not in state:
            raise ValueError(f"adaclip checkpoint {path}: key {k!r} is missing (keys: {sorted(state)[:8]}...)")
    length, visual = state[need[0]].shape
    text = state[need[1]].shape[1]
    embed = state[need[3]].shape[0]
    depth = count(f"{KEY_PREFIX}visual_prompter.static_prompts.")
    layers = count(f"{KEY_PREFIX}patch_token_layer.head.")
    return AdaClipModel(visual, text, embed, layers, length, depth)


def load_model(path: str | Path, backbone=None) -> AdaClipModel:
    """Learnable parts of a checkpoint (ours or the official ``pretrained_*.pth``), keys and shapes checked
    against the shapes the file implies and, with ``backbone``, against the backbone's widths and layers."""
    from ..checkpoints import load_weights_only

    path = Path(path)
    obj = load_weights_only(path, "adaclip checkpoint")
    if not isinstance(obj, dict):
        raise ValueError(f"adaclip checkpoint {path}: a {type(obj).__name__}, not a dict of tensors")
    state = {k: v for k, v in obj.items() if k != "meta"}
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"adaclip checkpoint {path}: key {bad[0]!r} is not a tensor")
    model = _infer(state, path)
    want = expected_shapes(model)
    extra, missing = sorted(set(state) - set(want)), sorted(set(want) - set(state))
    if extra or missing:
        raise ValueError(f"adaclip checkpoint {path}: unexpected keys {extra[:5]}, missing keys {missing[:5]}")
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"adaclip checkpoint {path}: key {k!r} has shape {tuple(state[k].shape)}, expected {shape}")
    if backbone is not None:
        d = backbone_dims(backbone)
        got = {"visual": model.visual_prompter.static_prompts[0].shape[1],
               "text": model.text_prompter.static_prompts[0].shape[1],
               "embed": model.cls_token_layer.head[0].weight.shape[0], "layers": len(model.patch_token_layer.head)}
        for name, value in got.items():
            if int(value) != d[name]:
                raise ValueError(f"adaclip checkpoint {path}: {name} size {int(value)} (key "
                                 f"{_KEY_OF[name]!r}) does not match the backbone's {d[name]}")
    model.load_state_dict({k[len(KEY_PREFIX):]: v.float() for k, v in state.items()})
    return model


_KEY_OF = {"visual": KEY_PREFIX + "visual_prompter.static_prompts.0",
           "text": KEY_PREFIX + "text_prompter.static_prompts.0",
           "embed": KEY_PREFIX + "cls_token_layer.head.0.weight",
           "layers": KEY_PREFIX + "patch_token_layer.head"}
