"""Anomaly Refinement Decoder (ARD), AnoRefiner paper Sec. 3.1, Fig. 3-5, Eq. 1-3.

Layout (paper names):

* **AnoB** (auxiliary anomaly-score branch): 1×1 conv A → ``anomaly_channels`` gives Â; concat(F, Â)
  → 1×1 conv → ``feat_channels`` gives F̂. With ``anob=False`` F̂ comes from F alone and there is no
  score branch at all (Table 2, row 1: a plain decoder).
* two **AR blocks** (:class:`ARBlock`): ×2 upsampling of both branches, 5×5 conv on the image
  branch, 3×3 conv on the score branch, the attention module on the image branch, and the
  attention output concatenated with the score features.
* **AA** (:class:`AnomalyAttention`, Eq. 1-2, Fig. 4), or vanilla spatial attention
  (:class:`SpatialAttention`, Table 3) or none.
* **BI** (:class:`BidirectionalInteraction`, Eq. 3).
* an upsample block to the input resolution and a segmentation head that returns logits.

Decisions the paper leaves open are :class:`ARDConfig` fields with a comment.

β of Eq. 1 lives on the AR-block grid, so it depends on the input size. Decision: β is allocated
for the grid given to :class:`ARD` (``grid=(h, w)`` of the feature map, from the feature cache);
when a forward pass sees another grid (a different resolution), β is bilinearly resized to it, so
the module still runs and a β learned at one size transfers smoothly. PGT always uses the grid it
was built for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import conv_bn_relu

ATTENTIONS = ("aa", "sa", "none")
DECODERS = ("ard", "destseg", "realnet", "unet")
FEATURE_FUSIONS = ("auto", "mean", "concat")


@dataclass
class ARDConfig:
    """Options of the ARD (section ``ard`` of ``--options``; variants override these)."""

    anob: bool = True  # auxiliary anomaly-score branch (Table 2)
    attention: str = "aa"  # "aa" (ours), "sa" (vanilla spatial attention, Table 3), "none" (Table 2)
    aa_zeta: bool = True  # ζ of Eq. 1; False = Table 11 "w/o ζ" (Y = Y_fuse)
    aa_weight: bool = True  # W; False = Table 11 "w/o W" (the AA output is Y itself)
    bi: bool = True  # Bidirectional Perception and Interaction block (Eq. 3); needs anob
    feat_channels: int = 256  # F̂ channels (paper Sec. 3.1)
    anomaly_channels: int = 64  # Â channels (paper Sec. 3.1)
    aa_channels: int = 192  # Y_top/Y_down/Y_fuse channels inside AA (paper Fig. 4)
    decoder: str = "ard"  # "ard" or a Table 12 baseline ("destseg", "realnet", "unet")
    # Image-branch channels after each AR block's 5×5 conv. The paper only gives F̂ = 256; None keeps
    # feat_channels in both blocks (no reduction is mentioned). Lower for CPU runs.
    ar_channels: tuple[int, ...] | None = None
    head_channels: int = 64  # upsample block / segmentation head width (not given; a common decoder width)
    norm: str = "bn"  # "bn" or "none" after the convs of the branches: not given; BN eases SGD at lr 1e-3
    upsample_mode: str = "bilinear"  # ×2 and final upsampling: not given; bilinear is the usual choice
    zeta_clamp: float = 20.0  # |(β−1)⊙Y_fuse| is clamped before exp so ζ cannot overflow to inf
    feature_fusion: str = "auto"  # how cached layers become F: "mean" (ViT, supp. A), "concat" (CNN), auto
    # Add logit(A) (the coarse map upsampled to the output, clamped to [coarse_skip_eps, 1 − eps]) to the head's
    # logits, so the ARD learns a correction of the coarse map instead of a map from scratch. The paper's head
    # has no such skip (False = paper-literal). Why it exists: with pseudo-anomalies only, the ARD learns to call
    # "anomalous" what looks like a pasted texture; real defects that look locally normal (missing parts) are
    # missed and normal textured structures can be flagged at full confidence. With the skip, where the image
    # branch has no evidence the ARD falls back to the coarse map (Table 9's "ARD ≈ ZSAD").
    coarse_skip: bool = False
    coarse_skip_eps: float = 1e-3

    def validate(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"ard.attention={self.attention!r}: expected one of {ATTENTIONS}")
        if self.decoder not in DECODERS:
            raise ValueError(f"ard.decoder={self.decoder!r}: expected one of {DECODERS}")
        if self.feature_fusion not in FEATURE_FUSIONS:
            raise ValueError(f"ard.feature_fusion={self.feature_fusion!r}: expected one of {FEATURE_FUSIONS}")
        if self.norm not in ("bn", "none"):
            raise ValueError(f"ard.norm={self.norm!r}: expected 'bn' or 'none'")
        if self.bi and not self.anob:
            raise ValueError("ard.bi=True needs ard.anob=True: BI (Eq. 3) interacts with the score branch")
        if not 0 < float(self.coarse_skip_eps) < 0.5:
            raise ValueError(f"ard.coarse_skip_eps={self.coarse_skip_eps!r}: expected 0 < eps < 0.5")
        if self.ar_channels is not None and len(self.ar_channels) != 2:
            raise ValueError(f"ard.ar_channels={self.ar_channels!r}: expected two values (one per AR block)")
        for key in ("feat_channels", "anomaly_channels", "aa_channels", "head_channels"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"ard.{key}={getattr(self, key)!r}: must be a positive integer")

    @property
    def block_channels(self) -> tuple[int, int]:
        if self.ar_channels is None:
            return (self.feat_channels, self.feat_channels)
        return (int(self.ar_channels[0]), int(self.ar_channels[1]))


def _resize(x: torch.Tensor, size, mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(x, size=size, mode=mode, align_corners=False)
    return F.interpolate(x, size=size, mode=mode)


class AnomalyAttention(nn.Module):
    """Anomaly-Attention module (Fig. 4, Eq. 1-2).

    ``Y_fuse = conv3(Y_top) + conv3(Y_down)``; ``ζ = exp((β−1)⊙Y_fuse)`` (Eq. 1) with β one learnable
    value per spatial position initialised to 1 (so ζ ≡ 1 at start); ``Y = Y_fuse⊙ζ`` (Eq. 2);
    ``W = sigmoid(conv3(conv3(Y)))`` (1 channel); output ``W⊙Y_down``.
    ``use_zeta=False`` sets Y = Y_fuse; ``use_weight=False`` returns Y itself (Table 11 "w/o W",
    the variant the paper says impairs decoding), which has ``channels`` channels.
    """

    def __init__(self, top_channels: int, down_channels: int, channels: int, grid: tuple[int, int],
                 use_zeta: bool = True, use_weight: bool = True, zeta_clamp: float = 20.0):
        super().__init__()
        self.proj_top = nn.Conv2d(top_channels, channels, 3, padding=1)
        self.proj_down = nn.Conv2d(down_channels, channels, 3, padding=1)
        self.use_zeta = use_zeta
        self.use_weight = use_weight
        self.zeta_clamp = float(zeta_clamp)
        self.beta = nn.Parameter(torch.ones(1, 1, int(grid[0]), int(grid[1]))) if use_zeta else None
        # The two 3×3 convs of W: the paper names no width or activation in between; a ReLU keeps them
        # from collapsing into one linear conv.
        self.weight_net = nn.Sequential(
            nn.Conv2d(channels, max(channels // 2, 1), 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(max(channels // 2, 1), 1, 3, padding=1),
        ) if use_weight else None
        self.out_channels = down_channels if use_weight else channels

    def zeta(self, y_fuse: torch.Tensor) -> torch.Tensor:
        """ζ of Eq. 1 for ``y_fuse`` [B,C,h,w] (β resized when the grid differs, see module doc)."""
        beta = self.beta
        if tuple(beta.shape[-2:]) != tuple(y_fuse.shape[-2:]):
            beta = F.interpolate(beta, size=y_fuse.shape[-2:], mode="bilinear", align_corners=False)
        exponent = (beta - 1.0) * y_fuse
        return torch.exp(exponent.clamp(-self.zeta_clamp, self.zeta_clamp))

    def forward(self, y_top: torch.Tensor, y_down: torch.Tensor) -> torch.Tensor:
        y_fuse = self.proj_top(y_top) + self.proj_down(y_down)
        y = y_fuse * self.zeta(y_fuse) if self.use_zeta else y_fuse
        if not self.use_weight:
            return y
        w = torch.sigmoid(self.weight_net(y))
        return w * y_down


class SpatialAttention(nn.Module):
    """Vanilla spatial attention (Table 3 "SA"): W = sigmoid(conv7×7([mean_c(Y), max_c(Y)])), W⊙Y_down.

    Same interface as :class:`AnomalyAttention` (``y_top`` is ignored) so it swaps in place.
    """

    def __init__(self, down_channels: int, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)
        self.out_channels = down_channels

    def forward(self, y_top: torch.Tensor, y_down: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([y_down.mean(1, keepdim=True), y_down.amax(1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled)) * y_down


class ARBlock(nn.Module):
    """Anomaly-aware Refinement block (Fig. 3): ×2 upsampling of both branches; 5×5 conv on the image
    branch, 3×3 conv on the score branch; attention on the image branch (Y_top = upsampled image
    features before the 5×5 conv, Y_down = after); output image features = concat(attention output,
    score features) when the score branch exists."""

    def __init__(self, in_channels: int, out_channels: int, score_channels: int, grid: tuple[int, int],
                 config: ARDConfig, concat_score: bool = True):
        super().__init__()
        self.mode = config.upsample_mode
        self.smooth = conv_bn_relu(in_channels, out_channels, 5, config.norm)
        self.score_conv = conv_bn_relu(score_channels, score_channels, 3, config.norm) if score_channels else None
        if config.attention == "aa":
            self.attention: nn.Module | None = AnomalyAttention(
                in_channels, out_channels, config.aa_channels, grid,
                use_zeta=config.aa_zeta, use_weight=config.aa_weight, zeta_clamp=config.zeta_clamp)
            att_out = self.attention.out_channels
        elif config.attention == "sa":
            self.attention = SpatialAttention(out_channels)
            att_out = out_channels
        else:
            self.attention = None
            att_out = out_channels
        self.concat_score = concat_score and score_channels > 0
        self.attention_channels = att_out
        self.out_channels = att_out + (score_channels if self.concat_score else 0)

    def forward(self, f: torch.Tensor, a: torch.Tensor | None):
        size = (f.shape[-2] * 2, f.shape[-1] * 2)
        y_top = _resize(f, size, self.mode)
        y_down = self.smooth(y_top)
        out = self.attention(y_top, y_down) if self.attention is not None else y_down
        if a is not None and self.score_conv is not None:
            a = self.score_conv(_resize(a, size, self.mode))
        if self.concat_score and a is not None:
            out = torch.cat([out, a], dim=1)
        return out, a


class BidirectionalInteraction(nn.Module):
    """BI block, Eq. 3: Â' = Â + conv3(ReLU(conv3(F̂))); F̂' = F̂ + conv3(ReLU(conv3(Â))).

    Both residual updates are computed from the pre-update tensors."""

    def __init__(self, feat_channels: int, score_channels: int):
        super().__init__()
        self.f_to_a = nn.Sequential(nn.Conv2d(feat_channels, score_channels, 3, padding=1), nn.ReLU(inplace=True),
                                    nn.Conv2d(score_channels, score_channels, 3, padding=1))
        self.a_to_f = nn.Sequential(nn.Conv2d(score_channels, feat_channels, 3, padding=1), nn.ReLU(inplace=True),
                                    nn.Conv2d(feat_channels, feat_channels, 3, padding=1))

    def forward(self, f: torch.Tensor, a: torch.Tensor):
        return f + self.a_to_f(a), a + self.f_to_a(f)


class ARD(nn.Module):
    """Anomaly Refinement Decoder: ``forward(features [B,C,h,w], coarse [B,1,h,w]) -> logits [B,1,R,R]``
    with ``R = h * patch_stride`` (the backbone's input resolution); sigmoid at inference.

    ``grid`` is the feature grid (h, w) that β of the AA modules is allocated for (see module doc).
    """

    def __init__(self, in_channels: int, config: ARDConfig | None = None, *, grid: tuple[int, int] = (37, 37),
                 patch_stride: int | float = 14):
        super().__init__()
        config = config or ARDConfig()
        config.validate()
        if config.decoder != "ard":
            raise ValueError(f"ard.decoder={config.decoder!r} is a baseline decoder: build it with "
                             "anorefiner.refine.decoders.build_decoder")
        self.config = config
        self.patch_stride = patch_stride
        self.grid = (int(grid[0]), int(grid[1]))
        norm = config.norm
        ca = config.anomaly_channels if config.anob else 0
        if config.anob:
            self.anob = nn.Sequential(nn.Conv2d(1, ca, 1), nn.ReLU(inplace=True))  # Â
            self.fuse_in = conv_bn_relu(in_channels + ca, config.feat_channels, 1, norm)  # F̂ from [F, Â]
        else:
            self.anob = None
            self.fuse_in = conv_bn_relu(in_channels, config.feat_channels, 1, norm)  # F̂ from F alone
        c1, c2 = config.block_channels
        g1 = (self.grid[0] * 2, self.grid[1] * 2)
        g2 = (self.grid[0] * 4, self.grid[1] * 4)
        self.block1 = ARBlock(config.feat_channels, c1, ca, g1, config, concat_score=True)
        # Block 2's score features are concatenated after BI (the "fused feature" of Sec. 3.1).
        self.block2 = ARBlock(self.block1.out_channels, c2, ca, g2, config, concat_score=False)
        cf = self.block2.attention_channels
        self.bi = BidirectionalInteraction(cf, ca) if config.bi else None
        self.upsample_block = conv_bn_relu(cf + ca, config.head_channels, 3, norm)
        self.head = nn.Sequential(conv_bn_relu(config.head_channels, config.head_channels, 3, norm),
                                  nn.Conv2d(config.head_channels, 1, 1))

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return (int(round(h * self.patch_stride)), int(round(w * self.patch_stride)))

    def forward(self, features: torch.Tensor, coarse: torch.Tensor, out_size=None) -> torch.Tensor:
        if features.ndim != 4 or coarse.ndim != 4 or coarse.shape[1] != 1:
            raise ValueError(f"ARD expects features [B,C,h,w] and coarse [B,1,h,w]; got {tuple(features.shape)} "
                             f"and {tuple(coarse.shape)}")
        if features.shape[-2:] != coarse.shape[-2:]:
            coarse = F.interpolate(coarse, size=features.shape[-2:], mode="bilinear", align_corners=True)
        size = tuple(out_size) if out_size is not None else self.output_size(*features.shape[-2:])
        if self.anob is not None:
            a = self.anob(coarse)
            f = self.fuse_in(torch.cat([features, a], dim=1))
        else:
            a = None
            f = self.fuse_in(features)
        f, a = self.block1(f, a)
        f, a = self.block2(f, a)
        if self.bi is not None:
            f, a = self.bi(f, a)
        if a is not None:
            f = torch.cat([f, a], dim=1)
        f = self.upsample_block(f)
        f = _resize(f, size, self.config.upsample_mode)
        logits = self.head(f)
        if self.config.coarse_skip:
            eps = float(self.config.coarse_skip_eps)
            prior = F.interpolate(coarse.float(), size=size, mode="bilinear", align_corners=False)
            logits = logits + torch.logit(prior.clamp(eps, 1 - eps)).to(logits.dtype)
        return logits


def fuse_layers(layers: dict, mode: str = "auto") -> torch.Tensor:
    """Cached layer tokens {name: [N,h,w,C]} → ARD input F [N,C',h,w].

    ``mean`` averages the layers (supplement A: ViT layers 6/12/18/24); ``concat`` concatenates their
    channels (CNN layers have different widths); ``auto`` = mean when all widths agree, else concat.
    """
    if not layers:
        raise ValueError("fuse_layers: no layers given")
    tensors = [torch.as_tensor(v).float() for v in layers.values()]
    grids = {tuple(t.shape[1:3]) for t in tensors}
    if len(grids) != 1:
        raise ValueError(f"fuse_layers: layers {list(layers)} have different grids {sorted(grids)}")
    widths = {t.shape[-1] for t in tensors}
    if mode == "auto":
        mode = "mean" if len(widths) == 1 else "concat"
    if mode == "mean":
        if len(widths) != 1:
            raise ValueError(f"fuse_layers: mode 'mean' needs equal channel counts, got {sorted(widths)} "
                             f"for layers {list(layers)}; use 'concat'")
        out = torch.stack(tensors).mean(0)
    elif mode == "concat":
        out = torch.cat(tensors, dim=-1)
    else:
        raise ValueError(f"fuse_layers: mode={mode!r}: expected one of {FEATURE_FUSIONS}")
    return out.permute(0, 3, 1, 2).contiguous()


def build_refiner(in_channels: int, config: ARDConfig, *, grid, patch_stride) -> nn.Module:
    """The ARD, or a Table 12 baseline decoder taking the same inputs."""
    config.validate()
    if config.decoder == "ard":
        return ARD(in_channels, config, grid=grid, patch_stride=patch_stride)
    from .decoders import build_decoder

    return build_decoder(config.decoder, in_channels, config, grid=grid, patch_stride=patch_stride)
