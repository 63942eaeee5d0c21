"""PromptAD's image side: its preprocessing and CLIP Surgery's dual-path (v-v) forward
(``FuNz-0/PromptAD@0f86ce0``; what each step follows: :mod:`.backend`'s docstring).

Shared by the backend and the training of the prompts (the shots' features), so both read images the same way.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SURGERY_BLOCKS = 12  # CLIPAD/transformer.py l.684: the last 12 blocks get the v-v path
PRE_RESIZE = 1024  # datasets/dataset.py l.46: cv2.resize to 1024 x 1024 before the 240-px transform


def _attention(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Attention`` l.102-135 on ``[N, L, C]``: (v-v branch, original branch), both through ``out_proj``."""
    attn = block.attn
    n, length, c = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.reshape(n, length, 3, h, c // h).permute(2, 0, 3, 1, 4)
    scale = (c // h) ** -0.5
    ori = torch.softmax(q @ k.transpose(-2, -1) * scale, -1) @ v
    vv = torch.softmax(v @ v.transpose(-2, -1) * scale, -1) @ v
    merge = lambda y: attn.out_proj(y.transpose(1, 2).reshape(n, length, c))  # noqa: E731
    return merge(vv), merge(ori)


def vv_forward(backbone, batch: torch.Tensor, surgery_blocks: int = SURGERY_BLOCKS, gallery_blocks=(3, 8)) -> dict:
    """The dual-path image forward: ``{"cls": [N, D], "tokens": [N, L, D], "gallery": [[N, L, W], ...]}``,
    every vector L2-normalised (``model.py`` encode_image). ``gallery_blocks`` are 1-based (none: no gallery, as
    training needs); a gallery block followed by a dual-path block is read after that block's attention (the
    official in-place add)."""
    v = backbone.visual
    blocks = list(backbone.blocks)
    n_blocks = len(blocks)
    first = n_blocks - min(int(surgery_blocks), n_blocks)  # 0-based index of the first dual-path block
    bad = [b for b in gallery_blocks if not 1 <= int(b) <= n_blocks]
    if bad or first >= n_blocks:
        raise ValueError(f"promptad: gallery blocks {list(gallery_blocks)} / surgery blocks {surgery_blocks} do not "
                         f"fit the backbone's {n_blocks} blocks")
    x = v.ln_pre(backbone.embed(batch))
    if not backbone.batch_first:
        raise ValueError("promptad needs open_clip blocks running batch-first (open_clip >= 3)")
    wanted = {int(b) - 1 for b in gallery_blocks}
    taken: dict[int, torch.Tensor] = {}
    x_vv = None
    with torch.no_grad():
        for i, block in enumerate(blocks):
            if i < first:
                x = block(x)
            else:
                vv_res, ori_res = _attention(block, block.ln_1(x))
                x_vv = (x if x_vv is None else x_vv) + vv_res
                x = x + ori_res
                if i - 1 in wanted:
                    taken[i - 1] = x  # the previous block's hooked view, after this block's attention add
                x = x + block.mlp(block.ln_2(x))
            if i in wanted and (i < first - 1 or i == n_blocks - 1):
                taken[i] = x
        cls = v.ln_post(x[:, 0]) @ v.proj
        tokens = v.ln_post(x_vv[:, 1:]) @ v.proj
    return {"cls": F.normalize(cls, dim=-1), "tokens": F.normalize(tokens, dim=-1),
            "gallery": [F.normalize(taken[b][:, 1:], dim=-1) for b in sorted(wanted)]}


def preprocess(backbone, images: list[np.ndarray], pre_resize: int, bgr: bool) -> torch.Tensor:
    """``dataset.py`` + ``model.transform``: (BGR,) bilinear to ``pre_resize`` (OpenCV INTER_LINEAR: no antialias,
    rounded to uint8), then the backbone's own bicubic resize to 240 and CLIP normalisation."""
    out = []
    for img in images:
        t = torch.from_numpy(np.array(img[..., ::-1] if bgr else img)).permute(2, 0, 1)[None].float()
        t = F.interpolate(t, size=(pre_resize, pre_resize), mode="bilinear", align_corners=False)
        out.append(t[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    return backbone.preprocess(out)
