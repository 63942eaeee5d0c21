"""Training one SeaS model per category: the generation model, then the Refined Mask Prediction
(HUST-SLOW/SeaS 4645d3b: ``models/seas.py`` with ``scripts/train_generation.sh``, ``models/seas_mask.py`` with
``scripts/train_mask.sh``). Both stages run in one job (rule ``train_seas``).

Generation (``seas.py`` L394-L494): per example an anomaly image with its Unbalanced Abnormal prompt and a
normal image with "a ob1"; both are encoded by the frozen VAE, noised at uniform timesteps and denoised by the
U-Net. Loss = MSE on the anomaly half + DA loss on its cross-attention maps (:func:`.losses.da_loss`) + MSE on
the normal half (NA loss). The whole U-Net (lr 4e-6) and the text encoder's token-embedding matrix (lr 4e-5) are
trained (the encoder layers, final LayerNorm and position embeddings are frozen, L254-L258); AdamW, gradients
accumulated over 2 batches, ``800 x defect types`` optimiser steps.

Mask (``seas_mask.py`` L295-L390): U-Net and text encoder frozen; the noisy anomaly latents are stepped once with
DDPM (x_t → x_{t-1}) and decoded; the RMP (:mod:`.rmp`) reads the U-Net's up-block features and the VAE decoder's
features; focal loss at the image size (anomaly half refined, normal half coarse, target 0) and at the latent
size; AdamW lr 5e-4, the same number of steps.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..log import LOG, progress
from ..seeding import rng as make_rng
from .config import SeaSConfig
from .data import TrainingSet, batches, select_training_set
from .losses import da_loss, focal_loss, pooled_masks
from .rmp import RMP
from .sd import (DTYPE, BlockOutputs, Components, CrossAttentionMaps, Tokens, add_tokens, feature_channels,
                 load_base, positions, token_ids, unet_features)

FORMAT = "anorefiner-seas/1"


def _adamw(params, lr: float, cfg: SeaSConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


class _Noise:
    """Seeded CPU draws moved to the device: the same numbers on any device."""

    def __init__(self, seed: int, device):
        self.gen, self.device = torch.Generator().manual_seed(int(seed)), device

    def randn(self, shape, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen).to(like.device, like.dtype)

    def timesteps(self, n: int, high: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=self.gen).to(self.device)


def encode_latents(vae, pixels: torch.Tensor, noise: _Noise) -> torch.Tensor:
    """``vae.encode(x).latent_dist.sample() · scaling_factor`` with a seeded draw."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return (dist.mean + dist.std * noise.randn(dist.mean.shape, dist.mean)) * vae.config.scaling_factor


def _prompts(tokens: Tokens, labels, with_normals: bool) -> list[str]:
    prompts = [tokens.prompt(int(k)) for k in labels]
    return prompts + [tokens.normal_prompt()] * len(prompts) if with_normals else prompts


def _pixels(batch: dict, with_normals: bool) -> torch.Tensor:
    return torch.cat([batch["anomaly"], batch["normal"]]) if with_normals else batch["anomaly"]


def _optimizer_steps(batch_iter, cfg: SeaSConfig, steps: int, desc: str):
    """Yield ``(batch, step_now)`` micro-batches; ``step_now`` says when the accumulated gradient is applied (every
    ``gradient_accumulation_steps`` batches and at an epoch's end, as accelerate does), ``steps`` times in all."""
    done, micro = 0, 0
    if steps <= 0:
        return
    bar = progress(total=steps, desc=desc, unit="step", leave=False)
    for batch in batch_iter:
        micro += 1
        now = micro % cfg.gradient_accumulation_steps == 0 or batch["end"]
        if now:
            micro = 0
            done += 1
            bar.update(1)
        yield batch, now
        if done >= steps:
            break
    bar.close()


def finetune_generation(comp: Components, tokens: Tokens, new_ids: list[int], data: TrainingSet, cfg: SeaSConfig,
                        device) -> list[dict]:
    """The generation stage (module docstring). Returns the loss terms of every optimiser step."""
    from diffusers import DDPMScheduler

    unet, enc, vae, tok = comp.unet, comp.text_encoder, comp.vae, comp.tokenizer
    vae.requires_grad_(False)
    enc.requires_grad_(False)
    embedding = enc.get_input_embeddings().weight
    embedding.requires_grad_(True)
    unet.requires_grad_(True)
    unet.train()
    enc.train()
    opt_unet = _adamw(unet.parameters(), cfg.gen_learning_rate, cfg)
    opt_text = _adamw([embedding], cfg.encoder_learning_rate, cfg)
    ddpm = DDPMScheduler.from_config(comp.scheduler_config)
    maps = CrossAttentionMaps(unet, cfg.da_factors)
    normal_ids = new_ids[: len(tokens.normal)]
    anomaly_ids = new_ids[len(tokens.normal):]
    noise = _Noise(cfg.seed, device)
    gen = make_rng(cfg.seed, "seas", "generation")
    b = cfg.batch_size
    steps = cfg.steps_per_defect_type * len(data.defect_types)
    history, acc = [], []
    data_iter = batches(data, cfg.resolution, b, gen, cfg.rotation, cfg.normal_alignment)
    try:
        for batch, step_now in _optimizer_steps(data_iter, cfg, steps, "seas generation"):
            with torch.no_grad():
                latents = encode_latents(vae, _pixels(batch, cfg.normal_alignment), noise)
            eps = noise.randn(latents.shape, latents)
            t = noise.timesteps(len(latents), ddpm.config.num_train_timesteps)
            noisy = ddpm.add_noise(latents, eps, t)
            ids = token_ids(tok, _prompts(tokens, batch["label"], cfg.normal_alignment)).to(device)
            maps.clear()
            pred = unet(noisy, t, enc(ids)[0]).sample
            target = eps if ddpm.config.prediction_type == "epsilon" else ddpm.get_velocity(latents, eps, t)
            terms = {"mse": F.mse_loss(pred[:b].float(), target[:b].float())}
            side = latents.shape[-1]
            recorded = {f: m[:b] for f, m in maps.maps(side).items()}
            terms["da"] = da_loss(recorded, positions(ids[:b], normal_ids), positions(ids[:b], anomaly_ids),
                                  pooled_masks(batch["mask"].to(device), side, cfg.da_factors),
                                  cfg.small_defect_masks)
            if cfg.normal_alignment:
                terms["na"] = F.mse_loss(pred[b:].float(), target[b:].float())
            loss = sum(terms.values())
            (loss / cfg.gradient_accumulation_steps).backward()
            acc.append({k: float(v.detach()) for k, v in terms.items()})
            if step_now:
                _apply_step((opt_unet, opt_text), acc, history, "generation")
    finally:
        maps.release()
    unet.eval()
    enc.eval()
    return history


def train_mask_head(comp: Components, tokens: Tokens, data: TrainingSet, cfg: SeaSConfig, device) -> tuple[RMP, list]:
    """The mask stage (module docstring): the trained RMP and its losses per optimiser step."""
    from diffusers import DDPMScheduler

    unet, enc, vae = comp.unet, comp.text_encoder, comp.vae
    for m in (unet, enc, vae):
        m.requires_grad_(False)
        m.eval()
    unet_ch, vae_ch = feature_channels(unet, vae)
    rmp = RMP(unet_ch, vae_ch, cfg.rmp_channels, cfg.rmp_heads, cfg.rmp_layers, cfg.rmp_groups).to(device)
    rmp.train()
    opt = _adamw(rmp.parameters(), cfg.rmp_learning_rate, cfg)
    ddpm = DDPMScheduler.from_config(comp.scheduler_config)
    up = BlockOutputs([unet.up_blocks[i] for i in unet_features(unet)])
    dec = BlockOutputs(list(vae.decoder.up_blocks)[:-1])
    noise = _Noise(cfg.seed + 1, device)
    gen = make_rng(cfg.seed, "seas", "mask")
    step_gen = torch.Generator().manual_seed(int(cfg.seed) + 2)
    size = cfg.resolution
    steps = cfg.steps_per_defect_type * len(data.defect_types)
    history, acc = [], []
    data_iter = batches(data, size, cfg.batch_size, gen, cfg.rotation, True)
    try:
        for batch, step_now in _optimizer_steps(data_iter, cfg, steps, "seas mask"):
            targets = _mask_targets(batch["mask"].to(device), size // vae_scale(vae), cfg.small_defect_masks)
            if targets is not None:  # None: no anomalous pixel left after resizing (seas_mask.py L356-L361)
                loss = _mask_loss(comp, rmp, tokens, batch, targets, ddpm, up, dec, noise, step_gen, cfg, device)
                acc.append({"focal": loss})
            if step_now and acc:
                _apply_step((opt,), acc, history, "mask")
    finally:
        up.release()
        dec.release()
    rmp.eval()
    return rmp, history


def _mask_loss(comp: Components, rmp: RMP, tokens: Tokens, batch: dict, targets, ddpm, up: BlockOutputs,
               dec: BlockOutputs, noise: _Noise, step_gen: torch.Generator, cfg: SeaSConfig, device) -> float:
    """One batch of the mask stage: frozen U-Net and VAE, RMP forward and backward; returns the loss."""
    unet, enc, vae = comp.unet, comp.text_encoder, comp.vae
    b, size = cfg.batch_size, cfg.resolution
    with torch.no_grad():
        latents = encode_latents(vae, _pixels(batch, True), noise)
        eps = noise.randn(latents.shape, latents)
        t = noise.timesteps(len(latents), ddpm.config.num_train_timesteps)
        noisy = ddpm.add_noise(latents, eps, t)
        ids = token_ids(comp.tokenizer, _prompts(tokens, batch["label"], True)).to(device)
        pred = unet(noisy, t, enc(ids)[0]).sample
        low, mid = (o.detach() for o in up.outputs)
        prev = torch.cat([ddpm.step(pred[i:i + 1], t[i], noisy[i:i + 1], generator=step_gen).prev_sample
                          for i in range(b)])
        vae.decode(prev / vae.config.scaling_factor)
        fine = [o.detach() for o in dec.outputs]
    probs, probs_latent = rmp(low, mid, fine, size, train=True)
    loss = focal_loss(probs, targets[0]) + focal_loss(probs_latent, targets[1])
    (loss / cfg.gradient_accumulation_steps).backward()
    return float(loss.detach())


def vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _mask_targets(mask: torch.Tensor, latent: int, small_defects: bool):
    """Targets at the image and latent sizes for ``[anomalous; normal]`` (``seas_mask.py`` L352-L371)."""
    zeros = torch.zeros_like(mask)
    if not small_defects:
        full = torch.cat([mask, zeros])
        return full, F.interpolate(full, size=(latent, latent), mode="bilinear", align_corners=False)
    if float(mask.max()) == 0:
        return None
    mask = mask / mask.max()
    small = F.interpolate(mask, size=(latent, latent), mode="bilinear", align_corners=False)
    if float(small.max()) == 0:
        return None
    small = small / small.max()
    return torch.cat([mask, zeros]), torch.cat([small, torch.zeros_like(small)])


def _apply_step(optimizers, acc: list[dict], history: list[dict], stage: str) -> None:
    """Apply the accumulated gradient and record the mean loss terms of its batches (then ``acc`` is emptied)."""
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    history.append({k: float(np.mean([a[k] for a in acc])) for k in acc[0]})
    acc.clear()
    bad = {k: v for k, v in history[-1].items() if not np.isfinite(v)}
    if bad:
        raise FloatingPointError(f"SeaS {stage} step {len(history)}: non-finite loss {bad}")


def train_seas(root, dataset: str, category: str, weights, cfg: SeaSConfig, out, device="cpu") -> Path:
    """Both stages for one category → ``out/`` (``unet/``, ``token_embedding.safetensors``, ``rmp.safetensors``,
    ``manifest.json``), published atomically (written to ``out.partial`` then renamed)."""
    cfg.validate()
    out = Path(out)
    t0 = time.time()
    data = select_training_set(root, category, dataset, cfg.anomaly_divisor, cfg.num_normal_images)
    LOG.info("seas %s/%s: %d defect types, %d anomaly images for training (excluded from scoring), %d normal images",
             dataset, category, len(data.defect_types), len(data.anomaly_ids), len(data.normal_ids))
    torch.manual_seed(cfg.seed)
    comp = load_base(weights, device)
    tokens = Tokens.make(len(data.defect_types), cfg.normal_token_num, cfg.anomaly_token_num)
    new_ids = add_tokens(comp, tokens, cfg.initializer_token, cfg.normal_initializer_token)
    gen_hist = finetune_generation(comp, tokens, new_ids, data, cfg, device)
    t1 = time.time()
    rmp, mask_hist = train_mask_head(comp, tokens, data, cfg, device)
    manifest = {"format": FORMAT, "dataset": dataset, "category": category, "config": asdict(cfg),
                "base": base_record(weights), "tokens": {"normal": list(tokens.normal),
                                                         "anomaly": [list(g) for g in tokens.anomaly]},
                "token_ids": new_ids, "training_set": data.manifest(),
                "history": {"generation": gen_hist, "mask": mask_hist},
                "timings": {"generation_s": t1 - t0, "mask_s": time.time() - t1}, "device": str(device)}
    save_model(out, comp, rmp, manifest, DTYPE[cfg.save_dtype])
    LOG.info("seas %s/%s: generation loss %s -> %s, mask loss %s -> %s (%.0f s) -> %s", dataset, category,
             _first_last(gen_hist), _first_last(gen_hist, -1), _first_last(mask_hist), _first_last(mask_hist, -1),
             time.time() - t0, out)
    return out


def _first_last(history: list[dict], i: int = 0) -> str:
    return "n/a" if not history else "{" + ", ".join(f"{k} {v:.4f}" for k, v in history[i].items()) + "}"


def base_record(weights) -> dict:
    """Where the Stable Diffusion weights came from: their folder and, when rule sd_weights fetched them,
    the repository, revision and checksums it verified (``fetch.json``)."""
    path = Path(weights)
    record = {"path": str(path)}
    fetched = path / "fetch.json"
    if fetched.is_file():
        record["fetch"] = json.loads(fetched.read_text())
    return record


def save_model(out: Path, comp: Components, rmp: RMP, manifest: dict, dtype: torch.dtype) -> Path:
    from safetensors.torch import save_file

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    comp.unet.to(dtype).save_pretrained(partial / "unet", safe_serialization=True)
    weight = comp.text_encoder.get_input_embeddings().weight.detach().to("cpu", dtype).contiguous()
    save_file({"weight": weight}, str(partial / "token_embedding.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in rmp.state_dict().items()}, str(partial / "rmp.safetensors"))
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    if out.exists():  # an empty folder made for the output, or a previous model being replaced
        shutil.rmtree(out)
    os.replace(partial, out)
    return out
