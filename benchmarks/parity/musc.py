"""MuSc parity adapter: ``xrli-U/MuSc@b76b93d`` against :mod:`anorefiner.zsad.musc.backend` and :mod:`.rscin`.

Official side (unchanged files): ``models.musc.MuSc(cfg)`` with ``configs/musc.yaml``'s settings (r 1/3/5, the
quarters of the depth) builds the CLIP through its vendored ``open_clip`` from the seeded random OpenAI-format
file and gives the preprocess; then the lines of ``MuSc.make_category_data`` (l.149-232: ``encode_image``,
``LNAMD._embed``, L2 norm, ``MSM(Z, topmin_max=0.3)`` per layer, means over layers and r, bilinear upsampling
with align_corners, the maximum, ``RsCIN(ac_score, class_tokens, [1, 2, 3])``) are restated on the official
modules, as that method also reads a dataset folder and computes metrics. Shims (ours, runtime only):
``download_pretrained_from_url`` returns the local file; stubs for cv2 / openpyxl (plots and spreadsheets, not
called); ``Tensor.to('cuda')`` kept on the CPU.

Ours: ``build_backbone`` with the same weights and the position-embedding resize of the project's MuSc rows
(:attr:`~anorefiner.zsad.registry.BackendType.pos_embed`, ``bicubic_no_antialias``: config/config.yaml's
``vit_l14_336_musc``), :func:`~anorefiner.zsad.musc.backend.score` (patch maps) and
:func:`~anorefiner.zsad.musc.rscin.rscin`. Six images (MSM needs a few references per image). Reported separately:
the image score's maximum taken on the patch-level map (the store's), not on the upsampled map; and the whole
path with the backbone's default antialiased resize, which the MuSc rows used before this check found that
MuSc's vendored ``open_clip/model.py`` ``resize_pos_embed`` takes ``antialias=True`` but never passes it to
``F.interpolate`` (l.413, 436-441): what that cost.
"""

from __future__ import annotations

from pathlib import Path

import torch
from core import config_quarters, quarter_layers

REPO = "xrli-U/MuSc"
COMMIT = "b76b93d"
PINNED = {
    "models/musc.py": "92e91d9d7806e724919bab90c9eb7148b73558fe",
    "models/modules/_LNAMD.py": "e4d7ebfaf64672fb05a03e9f23410c8398aa99e8",
    "models/modules/_MSM.py": "479b2d1c0da6528ff2b08d45f6bc91306e335c8d",
    "models/modules/_RsCIN.py": "b77a0f1deb2a0707e29a04082ccf7be718bc370c",
    "models/backbone/_backbones.py": "621e951e7f4c64c832c5fe7db8c51c615702c240",
    "models/backbone/open_clip/__init__.py": "088c86441ec71a241320de79b7b66a6afeb3a049",
    "models/backbone/open_clip/bpe_simple_vocab_16e6.txt.gz": "7b5088a527f720063f044eb928eee315f63b2fc0",
    "models/backbone/open_clip/factory.py": "b94aa5329c60c617c0913a80777e30e1b959831f",
    "models/backbone/open_clip/model.py": "9a011ac3914204cff5bb52376f6863f551d26ec9",
    "models/backbone/open_clip/openai.py": "cc4e13e876d6a7a3463b457e62c517cb063b1356",
    "models/backbone/open_clip/pretrained.py": "87e7e527497d643fdf6ac931ac73b6e887a90d0d",
    "models/backbone/open_clip/tokenizer.py": "23fcfcbcb4ca051ba5bba7520918693001999282",
    "models/backbone/open_clip/transform.py": "4d90d4c71f9830a1f81a58f2efbb7e8be3876bb3",
    "models/backbone/open_clip/transformer.py": "41bc997543549f03b84a0f36326844708f4e1128",
    "models/backbone/open_clip/model_configs/ViT-B-16.json": "395eea77ec3907c0611531aba63459b193e67b9c",
    "models/backbone/open_clip/model_configs/ViT-L-14-336.json": "8d1f74c2639c3a3705df9865b9c08215675ddc97",
    "datasets/mvtec.py": "eacba76561b5a7780456c19e326014db3215608b",
    "datasets/visa.py": "1b25de4bc033f0932f6a6f97b7e0106af19e119c",
    "datasets/btad.py": "3f2b6ff74f433bc37c4ae9425dc16d3502eae6ae",
    "utils/metrics.py": "4f480c34b28f9079dab8aa144c9d939ff07b8b7c",
}
DEFAULTS = {"model": "ViT-B-16", "image_size": 240, "n_images": 6}
K_LIST = [1, 2, 3]  # make_category_data: mvtec_ad
STAGES = [
    ("preprocessing", "resized, normalised image"),
    ("block_tokens", "raw patch tokens of the 4 layers"),
    ("patch_maps", "MSM maps, mean over layers and r, patch level"),
    ("maps", "maps upsampled to the input size (bilinear, align_corners)"),
    ("scores", "RsCIN of the upsampled maps' maxima"),
]
CHOICES = [
    ("scores_patch_max", "scores", "RsCIN of the patch-level maxima (the store's maps), as the backend"),
    ("block_tokens_antialiased", "block_tokens", "tokens with the backbone's default antialiased resize"),
    ("maps_antialiased", "maps", "maps with that position embedding (the MuSc rows before the fix)"),
    ("scores_antialiased", "scores", "scores with that position embedding"),
]


def official(root: Path, spec: dict) -> dict:
    import shims

    shims.torchvision_compat()
    shims.stub_missing("cv2", "openpyxl")
    shims.cuda_to_cpu()
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    import models.backbone.open_clip.openai as oc_openai
    from models.modules._LNAMD import LNAMD
    from models.modules._MSM import MSM
    from models.modules._RsCIN import RsCIN
    from models.musc import MuSc

    oc_openai.download_pretrained_from_url = lambda url, cache_dir=None: spec["clip"]
    layers, _ = config_quarters(root / "models" / "backbone" / "open_clip" / "model_configs" / f"{spec['model']}.json")
    cfg = {"datasets": {"data_path": "", "dataset_name": "mvtec_ad", "class_name": "ALL",
                        "img_resize": spec["image_size"], "divide_num": 1},
           "models": {"backbone_name": spec["model"], "pretrained": "openai", "batch_size": 4,
                      "feature_layers": [l - 1 for l in layers], "r_list": [1, 3, 5]},
           "device": 0, "testing": {"output_dir": str(Path(spec["work"]) / "musc_out"), "vis": False,
                                    "vis_type": "single_norm", "save_excel": False}}
    musc = MuSc(cfg, seed=spec["seed"])
    images = torch.stack([musc.preprocess(Image.open(p)) for p in spec["images"]])
    g, tokens = musc.clip_model.encode_image(images, musc.features_list)
    g = g / g.norm(dim=-1, keepdim=True)
    maps_r = []
    for r in musc.r_list:
        lnamd = LNAMD(device=musc.device, r=r, feature_dim=tokens[0].shape[-1], feature_layer=musc.features_list)
        z = lnamd._embed(tokens)
        z /= z.norm(dim=-1, keepdim=True)
        maps_r.append(torch.stack([MSM(Z=z[:, :, l, :], device=musc.device, topmin_min=0, topmin_max=0.3)
                                   for l in range(len(musc.features_list))]).mean(0))
    patch = torch.stack(maps_r).mean(0)
    b, n = patch.shape
    h = int(np.sqrt(n))
    full = F.interpolate(patch.view(b, 1, h, h), size=musc.image_size, mode="bilinear", align_corners=True)[:, 0]
    ac_score = full.numpy().reshape(b, -1).max(-1)
    scores = RsCIN(ac_score, [x.numpy() for x in g], k_list=K_LIST)
    return {"preprocessing": images, "block_tokens": torch.stack([t[:, 1:] for t in tokens], 1),
            "patch_maps": patch.reshape(b, h, h), "maps": full, "scores": np.asarray(scores)}


def ours(spec: dict, official: dict) -> dict:
    import numpy as np

    from anorefiner.backbones import build_backbone
    from anorefiner.backbones.clip_vit import DEFAULT_POS_EMBED, with_pos_embed
    from anorefiner.data.index import load_image
    from anorefiner.metrics.evaluate import resize_maps
    from anorefiner.zsad.musc.backend import score
    from anorefiner.zsad.registry import BACKEND_TYPES
    from anorefiner.zsad.musc.rscin import rscin

    size = spec["image_size"]
    bb = build_backbone(spec["model"], size, layers=quarter_layers(spec["model"]), pretrained=spec["clip_state"],
                        pos_embed=BACKEND_TYPES["musc"].pos_embed)
    x = bb.preprocess([load_image(p) for p in spec["images"]])
    n, (h, w) = len(x), bb.grid

    def path(backbone):
        with torch.no_grad():
            layers, cls = backbone.forward(x)
            patch = score(layers, (1, 3, 5), 0.3)
            g = backbone.image_embedding(cls).float().numpy()
        full = resize_maps(patch.numpy(), (size, size))
        tokens = torch.stack([layers[k].reshape(n, h * w, -1) for k in backbone.layers], 1)
        return tokens, patch, full, g

    tokens, patch, full, g = path(bb)
    out = {"preprocessing": x, "block_tokens": tokens, "patch_maps": patch, "maps": full,
           "scores": rscin(full.reshape(n, -1).max(1), g, K_LIST),
           "scores_patch_max": rscin(patch.numpy().reshape(n, -1).max(1), g, K_LIST).astype(np.float64)}
    tokens, _, full, g = path(with_pos_embed(bb, DEFAULT_POS_EMBED))
    out.update({"block_tokens_antialiased": tokens, "maps_antialiased": full,
                "scores_antialiased": rscin(full.reshape(n, -1).max(1), g, K_LIST)})
    return out
