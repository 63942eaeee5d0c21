"""Bayes-PFL's trainable model (``xiaozhen228/Bayes-PFL@8f155a0`` ``models/VPB.py`` Context_Prompting,
``models/PFL.py``, ``models/flows.py``, ``loss.py``), under the official state-dict names.

* Prompt bank: ``prompt_context [B, P, Wt]`` (B = 3 prompts, P = 5 context vectors, trunc-normal mean 0, std 0.02)
  and the state vectors ``prompt_state_normal`` / ``prompt_state_abnormal [B, Q, Wt]`` (Q = 5, means +0.5 / -0.5).
* Prompt flows (``PFL.py``): a Gaussian ``q(z0) = N(mu, var)`` with ``(mu, var) = (m(x), exp(lv(x) / 2))`` from
  two 3-layer Softplus MLPs (``InferenceBlock``; the second output is *used as the variance*), sampled by
  reparameterisation (``z0 = mu + sqrt(var) * eps``), then K = 10 planar flows ``z <- z + u tanh(w.z + b)`` with
  ``log|det| = log(|1 + (w (1 - tanh^2)).u| + 1e-5)`` (``flows.py``; no invertibility constraint on u).
  The image-specific flow (``PFL_context``, ``PlanarPFL``) takes u, w, b from linear maps of the image feature;
  the image-agnostic ones (``PFL_normal`` / ``PFL_abnormal``, ``PlanarPFL_state``) encode a learned ``state``
  vector with N(0, 1)-initialised flow parameters, and *share* one encoder (``state_encoder``).
* KL of ``loss.py`` binary_loss_function (summ=True): ``log q(z0) - log N(zK; 0, I) - sum log|det|``, Gaussian log
  densities without the 2 pi constant, summed over the batch and divided by the batch size B. For the state flows
  the single ``N(zK; 0, I)`` is broadcast against a ``[B, D]`` log-variance, so their term is
  ``(log q - log p) - log|det| / B`` (:func:`kl_term`).
* ``fuse`` (``Global_Feature``): ``Linear(4 Wv -> Wv/2)`` of the concatenated raw patch tokens, a softmax over the
  patches of ``Linear(Wv/2 -> 1)``, the weighted sum, ``Linear(Wv/2 -> Wt)``; ``RCA`` (``Zero_Parameter``): per
  layer ``F_s = L2(Linear_l(tokens))``, ``q = conv1x1(text)`` in 4 heads, ``softmax(q.F_s * Wt^-0.5)`` (the full
  width, not the head width) over the patches, ``L2(attn.F_s + text)``; ``class_mapping`` / ``image_mapping``
  ``Linear(Wt, Wt)``.
* Init (``_initialize_weights``): every ``nn.Linear`` N(0, 0.02) with zero bias (the conv keeps torch's default);
  the temperatures ``log(1 / 0.07)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class InferenceBlock(torch.nn.Module):
    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.module = torch.nn.Sequential(torch.nn.Linear(dim_in, hidden), torch.nn.Softplus(),
                                          torch.nn.Linear(hidden, hidden), torch.nn.Softplus(),
                                          torch.nn.Linear(hidden, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class Encoder(torch.nn.Module):
    """``(mu, exp(logvar / 2))``: the official code calls the second output the variance."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.weight_mean = InferenceBlock(dim, hidden, dim)
        self.weight_log_variance = InferenceBlock(dim, hidden, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight_mean(x), torch.exp(0.5 * self.weight_log_variance(x))


class Decoder(torch.nn.Module):
    """Kept for the official names; its reconstruction term never enters the loss."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.weight_mean = InferenceBlock(dim, hidden, dim)


class Flow(torch.nn.Module):
    """``PFL``: the encoder, the (unused) decoder and its ``p_mu`` head, K planar flows."""

    def __init__(self, encoder: Encoder, decoder: Decoder, dim: int, num_flows: int):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.p_mu = torch.nn.Sequential(torch.nn.Linear(dim, dim))
        self.num_flows = num_flows


class ImageFlow(Flow):
    """``PlanarPFL``: amortised flow parameters from the image feature."""

    def __init__(self, encoder: Encoder, decoder: Decoder, dim: int, num_flows: int):
        super().__init__(encoder, decoder, dim, num_flows)
        self.amor_u = torch.nn.Linear(dim, num_flows * dim)
        self.amor_w = torch.nn.Linear(dim, num_flows * dim)
        self.amor_b = torch.nn.Linear(dim, num_flows)

    def params(self, x: torch.Tensor):
        b, d, k = x.shape[0], x.shape[1], self.num_flows
        mu, var = self.encoder(x)
        return (mu, var, self.amor_u(x).view(b, k, d, 1), self.amor_w(x).view(b, k, 1, d),
                self.amor_b(x).view(b, k, 1, 1))


class StateFlow(Flow):
    """``PlanarPFL_state``: a learned state vector and free flow parameters (N(0, 1) init)."""

    def __init__(self, encoder: Encoder, decoder: Decoder, dim: int, num_flows: int):
        super().__init__(encoder, decoder, dim, num_flows)
        self.amor_u = torch.nn.Parameter(torch.randn(1, num_flows, dim, 1))
        self.amor_w = torch.nn.Parameter(torch.randn(1, num_flows, 1, dim))
        self.amor_b = torch.nn.Parameter(torch.randn(1, num_flows, 1, 1))
        self.state = torch.nn.Parameter(torch.randn(1, dim))

    def params(self):
        mu, var = self.encoder(self.state)
        return mu, var, self.amor_u, self.amor_w, self.amor_b


def planar_flows(z: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``z [n, D]`` through the K planar flows of ``u [n, K, D, 1]``, ``w [n, K, 1, D]``, ``b [n, K, 1, 1]``:
    ``(z_K [n, D], sum_k log|det J_k| [n])``."""
    log_det = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for k in range(u.shape[1]):
        prod = torch.bmm(w[:, k], z.unsqueeze(2)) + b[:, k]
        h = torch.tanh(prod)
        z = (z.unsqueeze(2) + u[:, k] * h).squeeze(2)
        psi = w[:, k] * (1 - h ** 2)
        log_det = log_det + torch.log(torch.abs(1 + torch.bmm(psi, u[:, k])) + 1e-5).reshape(-1)
    return z, log_det


def sample(mu: torch.Tensor, var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Reparameterisation ``mu + sqrt(var) * eps``."""
    return eps.to(mu.dtype) * var.sqrt() + mu


def kl_term(mu, var, z0, zk, log_det, batch: int) -> torch.Tensor:
    """``loss.py`` binary_loss_function's KL (summ=True) with the official broadcasting (module docstring)."""
    log_q = (-0.5 * (var.log() + (z0 - mu) ** 2 / var)).sum(1)
    log_p = (-0.5 * zk ** 2).sum(1)
    return ((log_q - log_p).expand(batch).sum() - log_det.sum()) / batch


class GlobalFeature(torch.nn.Module):
    """``Global_Feature`` (``fuse``): attention pooling of the concatenated layers' raw patch tokens."""

    def __init__(self, width: int, text_width: int, k: int):
        super().__init__()
        self.fuse_modules = torch.nn.Linear(width * k, width // 2)
        self.compress = torch.nn.Linear(width // 2, 1)
        self.post_process = torch.nn.Linear(width // 2, text_width)

    def forward(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        x = self.fuse_modules(torch.cat(tokens, dim=2))
        x = (torch.softmax(self.compress(x), dim=1) * x).sum(1)
        return self.post_process(x)


class RCA(torch.nn.Module):
    """``Zero_Parameter``: residual cross-modal attention of the text on one layer's projected patch tokens."""

    def __init__(self, width: int, text_width: int, k: int, heads: int = 4):
        super().__init__()
        if text_width % heads:
            raise ValueError(f"bayes_pfl: text width {text_width} is not divisible by {heads} RCA heads")
        self.heads = heads
        self.q_proj_pre = torch.nn.Conv1d(text_width, text_width, kernel_size=1)
        self.linear_proj = torch.nn.ModuleList([torch.nn.Linear(width, text_width, bias=False) for _ in range(k)])

    def forward(self, text: torch.Tensor, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``text [B, S, Wt]``, raw ``tokens [B, L, Wv]`` -> ``(updated text [B, S, Wt], F_s [B, L, Wt])``."""
        b, s, c = text.shape
        fs = F.normalize(self.linear_proj[layer](tokens), dim=-1)
        q = self.q_proj_pre(text.transpose(1, 2)).transpose(1, 2).reshape(b, s, self.heads, c // self.heads)
        kv = fs.reshape(b, fs.shape[1], self.heads, c // self.heads)
        attn = torch.softmax(torch.einsum("bnkc,bmkc->bknm", q, kv) * c ** -0.5, dim=-1)
        out = torch.einsum("bknm,bmkc->bnkc", attn, kv).reshape(b, s, c) + text
        return F.normalize(out, dim=-1), fs


class BayesPfl(torch.nn.Module):
    """``Context_Prompting``: every trainable part, registered in the official order (the optimiser groups and
    the state-dict names follow it)."""

    def __init__(self, width: int, text_width: int, embed: int, n_layers: int, prompt_num: int = 3,
                 context_len: int = 5, state_len: int = 5, num_flows: int = 10, rca_heads: int = 4):
        super().__init__()
        if embed != text_width:
            raise ValueError(f"bayes_pfl adds {embed}-d flow samples to {text_width}-d prompt tokens: the backbone's "
                             "joint embedding and text widths must match (VPB.py assumes it)")
        self.prompt_context = torch.nn.Parameter(torch.empty(prompt_num, context_len, text_width))
        self.prompt_state_normal = torch.nn.Parameter(torch.empty(prompt_num, state_len, text_width))
        self.prompt_state_abnormal = torch.nn.Parameter(torch.empty(prompt_num, state_len, text_width))
        self.temperature_pixel = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.temperature_image = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        hidden = width // 2
        self.context_encoder, self.context_decoder = Encoder(embed, hidden), Decoder(embed, hidden)
        self.state_encoder, self.state_decoder = Encoder(embed, hidden), Decoder(embed, hidden)
        self.PFL_context = ImageFlow(self.context_encoder, self.context_decoder, embed, num_flows)
        self.PFL_normal = StateFlow(self.state_encoder, self.state_decoder, embed, num_flows)
        self.PFL_abnormal = StateFlow(self.state_encoder, self.state_decoder, embed, num_flows)
        self.fuse = GlobalFeature(width, text_width, n_layers)
        self.RCA = RCA(width, text_width, n_layers, rca_heads)
        self.class_mapping = torch.nn.Linear(text_width, text_width)
        self.image_mapping = torch.nn.Linear(text_width, text_width)
        for m in self.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)
        torch.nn.init.trunc_normal_(self.prompt_context, mean=0.0, std=0.02)
        torch.nn.init.trunc_normal_(self.prompt_state_normal, mean=0.5, std=0.02)
        torch.nn.init.trunc_normal_(self.prompt_state_abnormal, mean=-0.5, std=0.02)

    @property
    def prompt_num(self) -> int:
        return int(self.prompt_context.shape[0])

    def banks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The normal and abnormal prompt banks ``[B, P + Q, Wt]`` (context then state vectors)."""
        return (torch.cat([self.prompt_context, self.prompt_state_normal], dim=1),
                torch.cat([self.prompt_context, self.prompt_state_abnormal], dim=1))

    def image_logits(self, text: torch.Tensor, image: torch.Tensor, tokens: list[torch.Tensor] | None = None
                     ) -> torch.Tensor:
        """``exp(tau_img) <L2(class_mapping(t)), L2(g)>`` ``[B, S]``; stage 2 (``tokens`` given) maps the image
        feature as ``image_mapping(g + fuse(tokens))`` first."""
        t = F.normalize(self.class_mapping(text), dim=-1)
        g = image if tokens is None else self.image_mapping(image + self.fuse(tokens))
        g = F.normalize(g, dim=-1)
        return self.temperature_image.exp() * torch.einsum("bsd,bd->bs", t, g.to(t.dtype))

    def pixel_logits(self, text: torch.Tensor, tokens: torch.Tensor, layer: int, grid: tuple[int, int]
                     ) -> torch.Tensor:
        """``exp(tau_pix) F_s . RCA(text)`` per prompt as ``[B, S, h, w]`` (token grid)."""
        updated, fs = self.RCA(text, tokens, layer)
        logits = self.temperature_pixel.exp() * torch.einsum("bld,bsd->bsl", fs, updated)
        return logits.reshape(logits.shape[0], logits.shape[1], grid[0], grid[1])


# ----------------------------------------------------------------------------- losses (loss.py)
def focal_loss(probs: torch.Tensor, gt: torch.Tensor, gamma: float = 2.0, eps: float = 1e-8) -> torch.Tensor:
    """``loss.py`` FocalLoss: ``-(1 - p_t)^gamma log(p_t + eps)``, mean over the foreground pixels of the batch plus
    mean over its background pixels."""
    pt = torch.where(gt > 0, probs[:, 1], probs[:, 0])
    loss = -((1 - pt) ** gamma) * torch.log(pt + eps)
    fg = (gt > 0).to(loss.dtype)
    return (loss * fg).sum() / (fg.sum() + eps) + (loss * (1 - fg)).sum() / ((1 - fg).sum() + eps)


def dice_loss(probs: torch.Tensor, gt: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``loss.py`` DiceLoss: the abnormal channel only, over the whole batch."""
    p, t = probs[:, 1], gt.to(probs.dtype)
    return 1 - (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def orthogonal_loss(text: torch.Tensor, prompt_num: int) -> torch.Tensor:
    """``Orthogonal_Loss``: mean squared off-diagonal cosine between the normal prompts, plus the abnormal ones."""
    total = 0
    for part in (text[:, :prompt_num], text[:, prompt_num:]):
        e = F.normalize(part, dim=-1)
        sim = torch.einsum("blc,bkc->blk", e, e) ** 2
        total = total + (sim * (1 - torch.eye(e.shape[1], dtype=e.dtype, device=e.device))).mean()
    return total
