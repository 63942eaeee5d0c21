"""Stable Diffusion components for SeaS, taken from ``diffusers``/``transformers`` as published (optional extra
``[seas]``), plus what SeaS reads out of them.

The official code vendors modified copies of diffusers 0.19's U-Net, transformer, attention processor and VAE
only to return three extra things (HUST-SLOW/SeaS 4645d3b, ``models/modules/``); here the stock classes are
used and the same quantities are read with hooks:

* the cross-attention probabilities of the prompt tokens in the U-Net's *down* blocks (``_attention_processor.py``
  L1137-L1145 computes them, ``_unet_2d_blocks.py`` L1019-L1021 averages a block's attention modules,
  ``_unet_2d_condition.py`` L1003-L1020 keeps the down block of each resolution and averages the heads):
  :class:`CrossAttentionMaps`;
* the outputs of the U-Net's up blocks (``_unet_2d_condition.py`` L965-L1000) and of the VAE decoder's up blocks
  (``_vae.py`` L228-L285), which the Refined Mask Prediction reads: :class:`BlockOutputs`.

Placeholder tokens (``seas.py`` L200-L246): ``ob1..obK`` (normal) and ``sks1..sks(4T)`` (four per defect type)
are added to the tokenizer; their embeddings start as those of "object" and "defect".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SUBFOLDERS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


def require_diffusers():
    """Import diffusers and transformers (the ``[seas]`` extra), with a clear error when missing."""
    from .._compat import import_torchvision

    import_torchvision()  # transformers may import torchvision; the CPU-torch shim must come first
    try:
        import diffusers
        import transformers
    except ImportError as err:
        raise ImportError(f"SeaS needs diffusers and transformers ({err}): pip install -e '.[seas]'") from err
    for lib in (diffusers, transformers):  # their loading bars and notices would drown the job's log
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    return diffusers, transformers


@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    base: str


def check_base(path: str | Path) -> Path:
    path = Path(path)
    missing = [s for s in SUBFOLDERS if not (path / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{path} is not a Stable Diffusion folder in diffusers layout: no {missing} "
                                "(rule sd_weights fetches one; or set seas.weights to yours)")
    return path


def load_base(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32,
              unet: str | Path | None = None) -> Components:
    """Tokenizer, text encoder, U-Net (``unet``: another folder, e.g. a fine-tuned one), VAE and scheduler config
    of a local diffusers folder (never the hub)."""
    diffusers, transformers = require_diffusers()
    path = check_base(path)
    kw = {"local_files_only": True}
    tokenizer = transformers.CLIPTokenizer.from_pretrained(path / "tokenizer", **kw)
    text_encoder = transformers.CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype, **kw)
    unet = diffusers.UNet2DConditionModel.from_pretrained(unet or path / "unet", torch_dtype=dtype, **kw)
    vae = diffusers.AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, **kw)
    scheduler = diffusers.DDPMScheduler.from_pretrained(path / "scheduler", **kw)
    for m in (text_encoder, unet, vae):
        m.to(device)
    return Components(tokenizer, text_encoder, unet, vae, dict(scheduler.config), str(path))


@dataclass(frozen=True)
class Tokens:
    """The placeholder tokens of one SeaS model and the prompts built from them (``seas_dataset.py`` L205-L218)."""

    normal: tuple[str, ...]
    anomaly: tuple[tuple[str, ...], ...]  # per defect type

    @classmethod
    def make(cls, n_types: int, normal_num: int, anomaly_num: int) -> "Tokens":
        normal = tuple(f"ob{i}" for i in range(1, normal_num + 1))
        anomaly = tuple(tuple(f"sks{t * anomaly_num + i}" for i in range(1, anomaly_num + 1)) for t in range(n_types))
        return cls(normal, anomaly)

    @property
    def all(self) -> list[str]:
        return list(self.normal) + [t for group in self.anomaly for t in group]

    def prompt(self, label: int) -> str:
        return f"a {' '.join(self.normal)} with {' '.join(self.anomaly[label])}"

    def normal_prompt(self) -> str:
        return f"a {' '.join(self.normal)}"


def add_tokens(components: Components, tokens: Tokens, initializer: str = "defect",
               normal_initializer: str = "object") -> list[int]:
    """Add ``tokens`` to the tokenizer and text encoder; new rows copy the initialisers' embeddings (seas.py
    L218-L246). Returns the new token ids."""
    tok, enc = components.tokenizer, components.text_encoder
    added = tok.add_tokens(tokens.all)
    if added != len(tokens.all):
        raise ValueError(f"the tokenizer of {components.base} already holds some of {tokens.all}")
    init = {}
    for word in (initializer, normal_initializer):
        ids = tok.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"SeaS initializer {word!r} must be a single token of the tokenizer (got {ids})")
        init[word] = ids[0]
    new_ids = tok.convert_tokens_to_ids(tokens.all)
    enc.resize_token_embeddings(len(tok), mean_resizing=False)
    weight = enc.get_input_embeddings().weight
    with torch.no_grad():
        for k, token_id in enumerate(new_ids):
            source = init[normal_initializer] if k < len(tokens.normal) else init[initializer]
            weight[token_id] = weight[source].clone()
    return list(new_ids)


def token_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's maximum length (``seas_dataset.py`` L45-L61)."""
    out = tokenizer(texts, truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt")
    return out.input_ids


def positions(ids: torch.Tensor, wanted: list[int]) -> torch.Tensor:
    """Per row of ``ids`` [B,L], a boolean mask of the positions holding one of the ``wanted`` token ids."""
    return torch.isin(ids, torch.as_tensor(wanted, device=ids.device))


class _RecordingProcessor:
    """Cross-attention computed explicitly (softmax(QK^T·scale) V, as diffusers' AttnProcessor), keeping the
    probabilities ``[B, heads, HW, L]`` in ``sink``."""

    def __init__(self, sink: list):
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        if encoder_hidden_states is None or hidden_states.ndim != 3 or attn.spatial_norm is not None \
                or attn.group_norm is not None or attn.norm_cross:
            raise NotImplementedError("SeaS reads cross-attention of Stable Diffusion 1.x-style transformer blocks")
        batch, length = encoder_hidden_states.shape[:2]
        mask = attn.prepare_attention_mask(attention_mask, length, batch)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, mask)
        self.sink.append(probs.view(batch, attn.heads, probs.shape[1], probs.shape[2]))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class CrossAttentionMaps:
    """Records the token cross-attention maps of the U-Net's down block at each latent/``factor`` resolution.

    :meth:`maps` gives ``{factor: [B, H, W, L]}``: probabilities averaged over the block's attention modules and
    heads (``_unet_2d_blocks.py`` L1019-L1021, ``_unet_2d_condition.py`` L1010-L1013)."""

    def __init__(self, unet, factors):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.sinks: dict[int, list] = {}
        processors = {}
        wanted = {}
        for f in factors:
            block = int(f).bit_length() - 1  # down block i works at latent / 2**i
            if block >= len(unet.down_blocks) or not hasattr(unet.down_blocks[block], "attentions"):
                raise ValueError(f"seas.da_factors: the U-Net has no cross-attention down block at latent/{f}")
            wanted[f"down_blocks.{block}."] = int(f)
        for name in unet.attn_processors:
            owner = next((f for prefix, f in wanted.items() if name.startswith(prefix)), None)
            if owner is not None and name.endswith("attn2.processor"):
                processors[name] = _RecordingProcessor(self.sinks.setdefault(owner, []))
            else:
                processors[name] = AttnProcessor2_0()
        unet.set_attn_processor(processors)
        self.unet = unet

    def clear(self) -> None:
        for sink in self.sinks.values():
            sink.clear()

    def maps(self, latent: int) -> dict[int, torch.Tensor]:
        out = {}
        for f, sink in self.sinks.items():
            if not sink:
                raise RuntimeError("no cross-attention was recorded: run the U-Net first")
            mean = torch.stack([p.mean(1) for p in sink]).mean(0)  # [B, HW, L]
            side = latent // f
            out[f] = mean.view(mean.shape[0], side, side, mean.shape[-1])
        return out

    def release(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.unet.set_attn_processor(AttnProcessor2_0())


class BlockOutputs:
    """Forward hooks keeping the output of each module in ``modules`` (U-Net or VAE-decoder up blocks)."""

    def __init__(self, modules):
        self.outputs: list = [None] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i):
        def hook(_module, _inputs, output):
            self.outputs[i] = output[0] if isinstance(output, tuple) else output
        return hook

    def release(self) -> None:
        for h in self.handles:
            h.remove()


def unet_features(unet) -> tuple[int, int]:
    """Indices of the U-Net up blocks the RMP reads: the last at latent/2 and the first at the latent size
    (SD's up blocks 1 and 2: 1280 channels at 32 px and 640 at 64 px, ``_RMP.py`` L266-L268)."""
    n = len(unet.up_blocks)
    if n < 3:
        raise ValueError(f"SeaS's mask head needs a U-Net with >= 3 up blocks, this one has {n}")
    return n - 3, n - 2


def feature_channels(unet, vae) -> tuple[list[int], list[int]]:
    """Channels of the U-Net features the RMP reads and of the VAE decoder up-block outputs it fuses
    (all but the last, which keeps the image size: SD's 512/512/256 channels at 128/256/512 px)."""
    rev = list(reversed(unet.config.block_out_channels))
    low, mid = unet_features(unet)
    vae_rev = list(reversed(vae.config.block_out_channels))
    return [rev[low], rev[mid]], vae_rev[: len(vae_rev) - 1]
