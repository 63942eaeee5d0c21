"""Settings of SeaS (config section ``seas.options``; per dataset ``seas.datasets.<name>``).

Every default is the official one, read from HUST-SLOW/SeaS at commit 4645d3b (``configs/seas.yaml``,
``scripts/train_generation.sh``, ``scripts/train_mask.sh``, ``datasets/seas_dataset.py``, ``models/*.py``);
the comment beside each value names the file and line. Values the official code sets by dataset name (VisA:
no rotation, guidance 2, ``> 0`` masks) are the per-dataset overrides of ``config/config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class SeaSConfig:
    """Training (generation model + Refined Mask Prediction) and generation settings of one SeaS model."""

    # --- training data (datasets/seas_dataset.py) ---
    resolution: int = 512  # configs/seas.yaml L3
    # The first max(n // 3, 1) anomalous test images of each defect type (file-name order) train SeaS
    # (seas_dataset.py L103-L106 counts them, L185-L186 opens 000.png ... in order); they are excluded from scoring.
    anomaly_divisor: int = 3
    num_normal_images: int = 60  # train/good images for the Normal-image Alignment (configs/seas.yaml L4)
    rotation: bool = True  # 0/90/180/270 rotation + flip per example (configs/seas.yaml L5; off for VisA, seas.py L87)
    # --- Unbalanced Abnormal prompt "a ob1 with sks1 sks2 sks3 sks4" (configs/seas.yaml L13-L15) ---
    normal_token_num: int = 1
    anomaly_token_num: int = 4  # per defect type
    initializer_token: str = "defect"  # anomaly tokens start as this word's embedding (seas.py L226, L246)
    normal_initializer_token: str = "object"  # normal tokens start as this word's embedding (seas.py L227, L244)
    # --- optimisation (configs/seas.yaml L17-L28; the official code uses bitsandbytes' 8-bit AdamW, seas.py L308,
    # seas_mask.py L229; this is torch's float32 AdamW, docs/seas.md) ---
    gen_learning_rate: float = 4e-6  # U-Net
    encoder_learning_rate: float = 4e-5  # token embedding matrix of the text encoder
    rmp_learning_rate: float = 5e-4  # Refined Mask Prediction head
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.01
    adam_epsilon: float = 1e-8
    batch_size: int = 2  # anomaly images per batch, each paired with a normal image (configs/seas.yaml L8-L9)
    gradient_accumulation_steps: int = 2  # configs/seas.yaml L22
    # Optimiser steps of each stage = this x the number of defect types (train_generation.sh L20, train_mask.sh L21).
    steps_per_defect_type: int = 800
    # --- losses (seas.py L449-L486) ---
    normal_alignment: bool = True  # NA loss on the paired normal images (configs/seas.yaml L31)
    # Decoupled Anomaly Alignment on the cross-attention maps of the U-Net down blocks at these fractions of the
    # latent size: 32 and 16 px for SD's 64-px latent (seas.py L460-L467; _unet_2d_condition.py L1003-L1013 keeps
    # the down block's maps only).
    da_factors: tuple[int, ...] = (2, 4)
    # "> 0" instead of "== 1" for the DA loss's normal-token pixels, and masks scaled to a maximum of 1 for the RMP
    # (seas.py L469-L472, seas_mask.py L355-L362: the official code does this for VisA and MVTec 3D AD).
    small_defect_masks: bool = False
    # --- Refined Mask Prediction (models/modules/_RMP.py L203-L311) ---
    rmp_channels: tuple[int, int] = (128, 64)  # 1x1 projections of the U-Net's latent/2 and latent features (L220-L229)
    rmp_heads: int = 8  # L249
    rmp_layers: int = 4  # self-attention transformer blocks on the coarse features (L239)
    rmp_groups: int = 32  # GroupNorm groups of those blocks (L248)
    # --- generation (configs/seas.yaml L35-L47, models/modules/_SeaSpipeline.py) ---
    num_inference_steps: int = 25  # DPM-Solver++ steps (configs/seas.yaml L41)
    guidance_scale: float = 8.0  # classifier-free guidance; 2 for VisA (configs/seas.yaml L42)
    add_noise_step: int = 1500  # the normal image's latent is noised to step 1500 of a 1500-step schedule (L38)
    mask_threshold: float = 0.2  # RMP probability above which a pixel is anomalous (configs/seas.yaml L44)
    mask_steps: int = 3  # RMP masks of the last 3 denoising steps are averaged (_SeaSpipeline.py L695)
    generation_batch_size: int = 10  # images denoised together (configs/seas.yaml L37); no effect on the result
    generation_dtype: str = "float16"  # the official pipeline runs in float16 (seas_infer.py L59); CPU: float32
    # Open (AnoRefiner does not say): the defect type of each pseudo-anomaly, drawn uniformly from the category's.
    # --- storage ---
    save_dtype: str = "float16"  # the fine-tuned U-Net and embeddings as stored (generation runs in float16)
    seed: int = 0  # training: data order, augmentation, noise, timesteps

    def validate(self) -> None:
        for key in ("resolution", "anomaly_divisor", "num_normal_images", "normal_token_num", "anomaly_token_num",
                    "batch_size", "gradient_accumulation_steps", "num_inference_steps", "add_noise_step",
                    "generation_batch_size", "rmp_heads", "rmp_layers", "rmp_groups"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"seas.{key}={getattr(self, key)!r}: must be >= 1")
        if int(self.steps_per_defect_type) < 0:
            raise ValueError(f"seas.steps_per_defect_type={self.steps_per_defect_type!r}: must be >= 0")
        if self.resolution % 8:
            raise ValueError(f"seas.resolution={self.resolution!r}: must be a multiple of 8 (the VAE's stride)")
        if not self.da_factors or any(int(f) < 1 or int(f) & (int(f) - 1) for f in self.da_factors):
            raise ValueError(f"seas.da_factors={self.da_factors!r}: expected powers of two >= 1")
        if len(self.rmp_channels) != 2 or sum(self.rmp_channels) % self.rmp_heads \
                or sum(self.rmp_channels) % self.rmp_groups:
            raise ValueError(f"seas.rmp_channels={self.rmp_channels!r}: two widths whose sum divides by rmp_heads "
                             f"({self.rmp_heads}) and rmp_groups ({self.rmp_groups})")
        if not 1 <= self.mask_steps <= self.num_inference_steps:
            raise ValueError(f"seas.mask_steps={self.mask_steps!r}: expected 1..num_inference_steps")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"seas.mask_threshold={self.mask_threshold!r}: expected a probability in (0, 1)")
        for key in ("generation_dtype", "save_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(f"seas.{key}={getattr(self, key)!r}: expected one of {DTYPES}")

    @property
    def channels(self) -> int:
        """Width of the RMP's coarse features (128 + 64 = 192 in the official code)."""
        return int(sum(self.rmp_channels))
