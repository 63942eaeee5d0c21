"""VCP-CLIP parity adapter: ``xiaozhen228/VCP-CLIP@4dd96ec`` against :mod:`anorefiner.zsad.vcp_clip.backend`.

Official side (unchanged files): ``models.model_CLIP.Load_CLIP(size, <OpenAI TorchScript file>,
deep_prompt_len=1, total_d_layer_len=11)`` (its own antialiased bicubic position-embedding resize, the extra
class word embedding, the learnable text prompts), ``Context_Prompting``, ``Prompt_Ensemble``, ``Zero_Parameter``
and ``test.py``'s ``LinearLayer``, all with the official (seeded) initialisation; the checkpoint is written in
``train.py``'s format (l.280-281: the three state dicts plus ``_freeze_stages(model, "prompt")``'s prompt
parameters at the top level) and reloaded as ``test.py`` does (``load_state_dict`` + ``_load_stages``); images
are read as ``utils/dataset.py`` does (``Image.open``) through ``_transform_test``. The per-batch lines of
``test.py`` (l.154-197) and ``calcuate_metric``'s map and score lines (l.226-235, with the official
``utils.tools.normalize``) are loop code inside functions that also compute metrics and figures, so they are
restated on the official modules' outputs; all three images form one class stack. Shims (ours, runtime only):
stubs for cv2 / albumentations (``utils.tools`` plots and ``utils.dataset`` training augmentation, not called);
``pkg_resources.packaging``; ``Tensor.to('cuda')`` kept on the CPU (an unused attention sum in
``models/transformer.py``).
CUDA autocast is a no-op on CPU.

Ours: ``build_backbone`` with the same weights, :class:`VcpClipBackend` with the official checkpoint
(``load_vcp_checkpoint``), ``topk_reference`` set to the input size so that the top-k is the official 2000
pixels. Project choices reported separately: the top-k scaled to the map size (default ``topk_reference`` 518)
and the scores without the official per-class min-max.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from core import config_quarters, official_module, quarter_layers

REPO = "xiaozhen228/VCP-CLIP"
COMMIT = "4dd96ec"
PINNED = {
    "test.py": "56aff518951d14c9875fbc48e078a6164a3fa94e",
    "train.py": "7280916377cf32491a5946ab78a1e8dcdb579714",
    "models/model_CLIP.py": "eb23bff45b751cb0ced0fa1a751b532d473d2ce7",
    "models/transformer.py": "08de2b1cb96d3e2d2d1e2574424e7d2b1e56941f",
    "models/pre_vcp.py": "21545cac37f87dddb877ad9c24f61845d49d4ceb",
    "models/post_vcp.py": "ad4f409ed8c1cf7cde126ed4cee93b8f13c51b77",
    "models/prompt_ensemble.py": "baa907831f4c04963c18ba74b8b144e8eaf85c5c",
    "models/simple_tokenizer.py": "48510b0e4b45c3d45fe76d487d7cff03808553af",
    "models/utils.py": "51e80c5e296b24cae130ab0459baf268e0db7673",
    "models/bpe_simple_vocab_16e6.txt.gz": "7b5088a527f720063f044eb928eee315f63b2fc0",
    "models/model_configs/ViT-B-16.json": "395eea77ec3907c0611531aba63459b193e67b9c",
    "models/model_configs/ViT-L-14-336.json": "8d1f74c2639c3a3705df9865b9c08215675ddc97",
    "utils/tools.py": "13fcfe4c948a1367280b30f7478b77083bcb2dcd",
    "utils/dataset.py": "30bdf1fb5fafb235df4258b198e4f722b5a8a054",
}
DEFAULTS = {"model": "ViT-B-16", "image_size": 240}
STAGES = [
    ("preprocessing", "resized, normalised image (squash resize)"),
    ("position_embedding", "visual position embedding at the input grid"),
    ("block_tokens", "raw tokens of the 4 tapped layers"),
    ("text_embeddings", "per-image Pre-VCP text [2, D]"),
    ("maps_raw", "raw branch: mean over layers of p_abnormal"),
    ("maps_new", "Post-VCP branch: mean over layers of p_abnormal"),
    ("maps", "class min-max of gaussian(0.2 raw + 0.8 new, sigma 8)"),
    ("scores", "mean(top-2000 raw) + mean(top-2000 new)"),
]
CHOICES = [
    ("scores_scaled_topk", "scores", "top-k scaled to the map size (topk_reference 518) instead of 2000 pixels"),
    ("scores_official_minmax", "scores_minmaxed", "scores without the official per-class min-max (vs min-maxed)"),
]


def official(root: Path, spec: dict) -> dict:
    import shims

    shims.torchvision_compat()
    shims.stub_missing("cv2", "albumentations")
    shims.pkg_resources_packaging()
    shims.cuda_to_cpu()
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    from models.model_CLIP import Load_CLIP, tokenize
    from models.post_vcp import Zero_Parameter
    from models.pre_vcp import Context_Prompting
    from models.prompt_ensemble import Prompt_Ensemble
    from utils.tools import normalize

    test = official_module(root, "test.py", "vcp_official_test")
    train = official_module(root, "train.py", "vcp_official_train")
    size = spec["image_size"]
    layers, cfg = config_quarters(root / "models" / "model_configs" / f"{spec['model']}.json")  # 6 12 18 24
    torch.manual_seed(spec["seed"])
    model, _, preprocess = Load_CLIP(size, spec["clip"], device="cpu", deep_prompt_len=1, total_d_layer_len=11)
    model.eval()
    linear = test.LinearLayer(cfg["vision_cfg"]["width"], cfg["embed_dim"], len(layers), spec["model"]).eval()
    pre = Context_Prompting(cfg, cla_len=2).eval()
    post = Zero_Parameter(dim_v=cfg["vision_cfg"]["width"], dim_t=cfg["text_cfg"]["width"],
                          dim_out=cfg["vision_cfg"]["width"]).eval()
    ensemble = Prompt_Ensemble(2, tokenize)
    ckpt = spec.get("checkpoint") or str(Path(spec["work"]) / "vcp_clip_official_checkpoint.pth")
    if not spec.get("checkpoint"):
        save = {"trainable_linearlayer": linear.state_dict(), "New_Lan_Embed": pre.state_dict(),
                "Zero_try": post.state_dict()}
        save.update(train._freeze_stages(model, "prompt"))  # train.py l.280-281
        torch.save(save, ckpt)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    linear.load_state_dict(checkpoint["trainable_linearlayer"], strict=False)
    pre.load_state_dict(checkpoint["New_Lan_Embed"])
    post.load_state_dict(checkpoint["Zero_try"], strict=False)
    test._load_stages(model, checkpoint, "prompt")
    image = torch.stack([preprocess(Image.open(p)) for p in spec["images"]])
    g, patch_tokens = model.encode_image(image, layers)
    class_token = pre.before_extract_feat(patch_tokens, g.clone(), use_global=True)
    text = ensemble.forward_ensemble(model, class_token, "cpu").permute(0, 2, 1)  # [B, D, 2]
    maps_new, maps_raw = [], []
    for tokens in patch_tokens:
        dense = tokens[:, 1:, :] / tokens[:, 1:, :].norm(dim=-1, keepdim=True)
        _, f_t = post(text.permute(0, 2, 1), dense)
        maps_new.append(_probs(post.prompt_temp_l1.exp() * dense @ f_t.permute(0, 2, 1), size))
    for dense in linear(patch_tokens):
        dense = dense / dense.norm(dim=-1, keepdim=True)
        maps_raw.append(_probs(pre.prompt_temp.exp() * dense @ text, size))
    raw, new = np.mean(maps_raw, axis=0), np.mean(maps_new, axis=0)
    final = normalize(gaussian_filter(0.2 * raw + 0.8 * new, sigma=8, axes=(1, 2)))
    k = -2000
    scores = (np.mean(np.partition(raw.reshape(len(raw), -1), kth=k)[:, k:], axis=1)
              + np.mean(np.partition(new.reshape(len(new), -1), kth=k)[:, k:], axis=1))
    return {"preprocessing": image, "position_embedding": model.visual.positional_embedding.detach(),
            "block_tokens": torch.stack([t[:, 1:] for t in patch_tokens], 1), "text_embeddings": text.permute(0, 2, 1),
            "maps_raw": raw, "maps_new": new, "maps": final, "scores": scores,
            "scores_minmaxed": (scores - scores.min()) / (scores.max() - scores.min()),
            "checkpoint": torch.tensor(list(ckpt.encode()))}


def _probs(logits: torch.Tensor, size: int) -> np.ndarray:
    import torch.nn.functional as F

    b, n, _ = logits.shape
    h = int(np.sqrt(n))
    up = F.interpolate(logits.permute(0, 2, 1).reshape(b, 2, h, h), size=size, mode="bilinear", align_corners=True)
    return torch.softmax(up, dim=1)[:, 1].numpy()


def ours(spec: dict, official: dict) -> dict:
    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import load_image
    from anorefiner.zsad.vcp_clip.backend import (VcpClipBackend, VcpClipConfig, branch_maps, class_minmax,
                                          effective_topk, image_scores, smooth)

    ckpt = bytes(official["checkpoint"].tolist()).decode()
    size = spec["image_size"]
    bb = build_backbone(spec["model"], size, layers=quarter_layers(spec["model"]), pretrained=spec["clip_state"])
    backend = VcpClipBackend(VcpClipConfig(checkpoint=ckpt, topk_reference=size), backbone=bb)
    m = backend.model
    with torch.no_grad():
        x = bb.preprocess([load_image(p) for p in spec["images"]])
        layers, cls = bb.forward(x)
        n, (h, w) = len(x), bb.grid
        toks = [layers[k].reshape(n, h * w, -1) for k in bb.layers]
        text = m.text(bb, backend.tokens, bb.image_embedding(cls, normalize=False).float())
        raw, new = branch_maps(*m.layer_logits(toks, text, (h, w)), size)
        sm = smooth(raw.numpy(), new.numpy(), 0.2, 8.0)
        scores = image_scores(raw, new, backend.topk)
    return {"preprocessing": x, "position_embedding": bb.pos_embed, "block_tokens": torch.stack(toks, 1),
            "text_embeddings": text, "maps_raw": raw, "maps_new": new,
            "maps": class_minmax(sm, float(sm.min()), float(sm.max())), "scores": scores,
            "scores_scaled_topk": image_scores(raw, new, effective_topk(2000, size * size)),
            "scores_official_minmax": scores}
