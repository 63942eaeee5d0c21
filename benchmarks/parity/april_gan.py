"""APRIL-GAN parity adapter: ``ByChelsea/VAND-APRIL-GAN@f13b8a6`` against :mod:`anorefiner.zsad.april_gan.backend`.

Official side (unchanged files): the repository's vendored ``open_clip.create_model_and_transforms(model, size,
pretrained='openai')`` builds the CLIP from the seeded random OpenAI-format file (its own
``resize_pos_embed``) and the test preprocess; ``model.LinearLayer`` gets seeded random weights, saved in
``train.py``'s format (``{'trainable_linearlayer': state_dict}``) and reloaded as ``test.py`` does;
``prompt_ensemble.encode_text_with_prompt_ensemble`` gives the text; images are read as ``dataset.py`` does
(``Image.open``, the preprocess converts to RGB). The per-image lines of ``test.py`` (l.161-183: image score,
adapters, 100 * p @ T, bilinear upsampling with align_corners, softmax, sum over layers) are loop code inside
``test()``, so the adapter restates them on the official modules' outputs. Shims (ours, runtime only):
``download_pretrained_from_url`` returns the local file; stubs for cv2/skimage/tabulate (``test.py`` metrics
and plots, not imported here); ``pkg_resources.packaging``; ``Tensor.to('cuda')`` kept on the CPU (an unused
attention sum in ``open_clip/transformer.py``). CUDA autocast is a no-op on CPU.

Ours: ``build_backbone`` with the same file as local weights, :class:`AprilGanBackend` with the official
checkpoint (``load_adapters``). Project choices reported separately: the fp16 feature cache (tokens rounded
to fp16 before the adapters) and the area-mean token-grid storage (the stored grid upsampled back as the
metrics do, ``metrics.evaluate.resize_maps``, against the official full-resolution map).
"""

from __future__ import annotations

from pathlib import Path

import torch
from core import config_quarters, quarter_layers

REPO = "ByChelsea/VAND-APRIL-GAN"
COMMIT = "f13b8a6"
PINNED = {
    "model.py": "e3a16ec5afe62a9cca6abef7a7267b7437ac32a0",
    "prompt_ensemble.py": "617225abd98fd68bcf242b2a6fd8c7acf33886a3",
    "test.py": "c98063815ba3b4bdbe686477a42d9ed54d88e402",
    "dataset.py": "0487b04608c25e69bc6a2db9a3f81194f9bb1f48",
    "open_clip/__init__.py": "088c86441ec71a241320de79b7b66a6afeb3a049",
    "open_clip/bpe_simple_vocab_16e6.txt.gz": "7b5088a527f720063f044eb928eee315f63b2fc0",
    "open_clip/factory.py": "b94aa5329c60c617c0913a80777e30e1b959831f",
    "open_clip/model.py": "b1bf75169ccaaab8405df990c7ec4b3a2561cf31",
    "open_clip/openai.py": "cc4e13e876d6a7a3463b457e62c517cb063b1356",
    "open_clip/pretrained.py": "87e7e527497d643fdf6ac931ac73b6e887a90d0d",
    "open_clip/tokenizer.py": "23fcfcbcb4ca051ba5bba7520918693001999282",
    "open_clip/transform.py": "4d90d4c71f9830a1f81a58f2efbb7e8be3876bb3",
    "open_clip/transformer.py": "5b33ed7a87dfc4e4275ef11949751a52efe86784",
    "open_clip/utils.py": "51e80c5e296b24cae130ab0459baf268e0db7673",
    "open_clip/model_configs/ViT-B-16.json": "395eea77ec3907c0611531aba63459b193e67b9c",
    "open_clip/model_configs/ViT-L-14-336.json": "8d1f74c2639c3a3705df9865b9c08215675ddc97",
}
DEFAULTS = {"model": "ViT-B-16", "image_size": 240, "class_name": "metal_nut"}
STAGES = [
    ("preprocessing", "resized, normalised image (squash resize)"),
    ("position_embedding", "visual position embedding at the input grid"),
    ("block_tokens", "raw patch tokens of the 4 tapped layers"),
    ("text_embeddings", "prompt-ensemble text features [2, E]"),
    ("maps", "full-resolution map: sum over layers of p_abnormal"),
    ("scores", "softmax(100 g T)[abnormal]"),
]
CHOICES = [
    ("maps_fp16_cache", "maps", "fp16 feature cache: tokens rounded to fp16 before the adapters"),
    ("maps_from_stored_grid", "maps", "area-mean token-grid store, upsampled back as the metrics do"),
]


def official(root: Path, spec: dict) -> dict:
    import shims

    shims.torchvision_compat()
    shims.stub_missing("cv2", "skimage", "tabulate")
    shims.pkg_resources_packaging()
    shims.cuda_to_cpu()
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    import open_clip
    import open_clip.openai
    from model import LinearLayer
    from prompt_ensemble import encode_text_with_prompt_ensemble

    if not Path(open_clip.__file__).resolve().is_relative_to(root):
        raise RuntimeError(f"open_clip imported from {open_clip.__file__}, not the official vendored copy")
    open_clip.openai.download_pretrained_from_url = lambda url, cache_dir=None: spec["clip"]
    size = spec["image_size"]
    layers, cfg = config_quarters(root / "open_clip" / "model_configs" / f"{spec['model']}.json")  # 6 12 18 24
    model, _, preprocess = open_clip.create_model_and_transforms(spec["model"], size, pretrained="openai")
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec["model"])
    torch.manual_seed(spec["seed"])
    linear = LinearLayer(cfg["vision_cfg"]["width"], cfg["embed_dim"], len(layers), spec["model"])
    ckpt = spec.get("checkpoint") or str(Path(spec["work"]) / "april_gan_official_checkpoint.pth")
    if not spec.get("checkpoint"):
        torch.save({"trainable_linearlayer": linear.state_dict()}, ckpt)  # train.py's format
    linear.load_state_dict(torch.load(ckpt, weights_only=True)["trainable_linearlayer"])
    text = encode_text_with_prompt_ensemble(model, [spec["class_name"]], tokenizer, "cpu")[spec["class_name"]]
    out = {k: [] for k in ("preprocessing", "block_tokens", "maps", "scores")}
    for path in spec["images"]:
        image = preprocess(Image.open(path)).unsqueeze(0)
        pooled, tokens = model.encode_image(image, layers)
        g = pooled / pooled.norm(dim=-1, keepdim=True)
        out["scores"].append((100.0 * g @ text).softmax(dim=-1)[0, 1])
        out["preprocessing"].append(image[0])
        out["block_tokens"].append(torch.stack([t[0, 1:] for t in tokens]))
        maps = []
        for p in linear([t.clone() for t in tokens]):
            p = p / p.norm(dim=-1, keepdim=True)
            logits = 100.0 * p @ text
            h = int(np.sqrt(logits.shape[1]))
            up = F.interpolate(logits.permute(0, 2, 1).reshape(1, 2, h, h), size=size, mode="bilinear",
                               align_corners=True)
            maps.append(torch.softmax(up, dim=1)[0, 1])
        out["maps"].append(torch.stack(maps).sum(0))
    out["position_embedding"] = model.visual.positional_embedding.detach()
    out["text_embeddings"] = text.T  # [E, 2] -> [2, E]
    out["checkpoint"] = torch.tensor(list(ckpt.encode()))
    return out


def ours(spec: dict, official: dict) -> dict:
    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import load_image
    from anorefiner.metrics.evaluate import resize_maps
    from anorefiner.zsad.april_gan.backend import (AprilGanBackend, AprilGanConfig, full_map, image_scores, layer_logits,
                                           patch_map)

    ckpt = bytes(official["checkpoint"].tolist()).decode()
    size = spec["image_size"]
    bb = build_backbone(spec["model"], size, layers=quarter_layers(spec["model"]), pretrained=spec["clip_state"])
    backend = AprilGanBackend(AprilGanConfig(checkpoint=ckpt, class_name=spec["class_name"], device="cpu"),
                              backbone=bb)
    images = [load_image(p) for p in spec["images"]]
    out: dict = {}
    with torch.no_grad():
        x = bb.preprocess(images)
        layers, cls = bb.forward(x)
        n, (h, w) = len(images), bb.grid
        toks = [layers[k].reshape(n, h * w, -1) for k in bb.layers]

        def maps_of(tokens):
            logits = [layer_logits(p, backend.text, (h, w), 100.0) for p in backend.adapters(tokens)]
            return full_map(logits, size)

        out["preprocessing"] = x
        out["position_embedding"] = bb.pos_embed
        out["block_tokens"] = torch.stack(toks, 1)
        out["text_embeddings"] = backend.text
        out["maps"] = maps_of(toks)
        out["scores"] = image_scores(bb.image_embedding(cls), backend.text, 100.0)
        out["maps_fp16_cache"] = maps_of([t.half().float() for t in toks])
        stored = patch_map(out["maps"], (h, w))
        out["maps_from_stored_grid"] = torch.from_numpy(resize_maps(stored.numpy(), (size, size)))
    return out
