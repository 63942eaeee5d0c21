"""A tiny random Stable Diffusion folder (diffusers layout) for tests and offline runs of the SeaS code path.

Same classes and layout as Stable Diffusion v1.4 (CLIP tokenizer and text encoder, 4-level U-Net with
cross-attention in its first three down blocks, KL VAE, the scaled-linear PNDM schedule config), with widths of
8-16 channels, a 2-level VAE (32-px images, 16-px latents) and a 16-token context. Built from a seed, saved with
``save_pretrained``; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Words the tokenizer knows (besides the characters): the prompt words and SeaS's two initialisers.
WORDS = ("a", "with", "defect", "object")
IMAGE_SIZE = 32  # with the 2-level VAE: 16-px latents; SeaS's DA maps at 8 and 4 px
MAX_LENGTH = 16


def _write_tokenizer(folder: Path) -> None:
    """A CLIP BPE vocabulary holding the characters of :data:`WORDS` and merges that rebuild each word."""
    from transformers import CLIPTokenizer

    chars = sorted(set("".join(WORDS)))
    vocab: dict[str, int] = {}
    for c in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(c, len(vocab))
    merges = []
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for s in symbols[1:]:
            merges.append(f"{current} {s}")
            current += s
            vocab.setdefault(current, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    raw = folder / "raw"
    raw.mkdir(parents=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tok = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=MAX_LENGTH,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(folder / "tokenizer")
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()


def build_tiny_sd(out: str | Path, seed: int = 0) -> Path:
    """Write the tiny model to ``out`` (tokenizer/, text_encoder/, unet/, vae/, scheduler/) and return it."""
    from .sd import require_diffusers

    diffusers, transformers = require_diffusers()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out)
    vocab = len(transformers.CLIPTokenizer.from_pretrained(out / "tokenizer"))
    torch.manual_seed(seed)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH, projection_dim=16))
    text.save_pretrained(out / "text_encoder")
    _legacy_keys(out / "text_encoder" / "model.safetensors")
    unet = diffusers.UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=1, cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    unet.save_pretrained(out / "unet")
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=IMAGE_SIZE)
    vae.save_pretrained(out / "vae")
    diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                            steps_offset=1, set_alpha_to_one=False).save_pretrained(out / "scheduler")
    return out


def _legacy_keys(path: Path) -> None:
    """Stable Diffusion v1.4's text encoder file names its tensors ``text_model.*`` (transformers 4's layout); the
    tiny one is written the same way so that the tests load that layout."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def tiny_config(**overrides) -> dict:
    """SeaS options that fit the tiny model (32-px images, narrow RMP, a few steps), as a ``seas.options`` dict."""
    opts = {"resolution": IMAGE_SIZE, "num_normal_images": 4, "steps_per_defect_type": 1, "rmp_channels": [16, 16],
            "rmp_heads": 2, "rmp_layers": 1, "rmp_groups": 4, "num_inference_steps": 3, "mask_steps": 2,
            "generation_batch_size": 4}
    opts.update(overrides)
    return opts
