"""AA-CLIP parity adapter: ``Mwxinnn/AA-CLIP@53db195`` against :mod:`anorefiner.zsad.aa_clip`.

Official side (unchanged files): ``model.clip.create_model("ViT-L-14-336", img_size, pretrained="openai")`` (its
own open_clip fork: GELU, antialiased bicubic position-embedding resize), ``model.adapter.AdaptedCLIP`` with the
official (seeded) Xavier initialisation and ``test.py``'s arguments (weights 0.1, 3 text / 6 image adapters,
``--relu`` off); the adapters are written in ``train.py``'s two files (l.106-113 ``text_adapter.pth``, l.162-173
``image_adapter_<epoch>.pth``) and reloaded as ``test.py`` does (l.163-176); the images go through
``dataset.BaseSingleClassDataset`` (a jsonl of the test images, ``Image.open().convert("RGB")``, its transforms)
into ``test.py``'s ``get_predictions`` (the official per-batch maps and detection scores, kornia's blur); the
text is ``forward_utils.get_adapted_text_embedding(model, "MVTec", ...)`` of the class. ``metrics_eval``'s
normalisation and fusion lines (``forward_utils.py`` l.241-252) are loop code inside a metrics function, so they
are restated on ``get_predictions``' outputs; so are ``train.py``'s text-stage feature lines (l.74-85) on the
official surgery tower (``create_model`` + ``visual.DAPM_replace(DPAM_layer=20)``), whose v-v attention runs over
the batch of 3 images (the official layout). ``AdaptedCLIP.forward`` is called once more for the level tokens.

The official code only supports ViT-L-14-336 (``AdaptedCLIP`` hard-codes 1024 / 768 widths and 24 blocks), so
the check runs its architecture with seeded random weights at a small input (112 px, an 8 x 8 grid). It needs
kornia (``requirements.txt``: 0.6.9), which the project does not depend on: install it apart,
``pip install --no-deps --target DIR kornia==0.6.9``, and run with ``PYTHONPATH=DIR``. Shims (ours, runtime
only): ``model.clip._MODEL_CKPT_PATHS`` points at the local CLIP file (the path the official code hard-codes);
stubs for cv2 and ipdb (visualisation and debugging imports, not called); ``pkg_resources.packaging``.

Ours: ``build_backbone`` with the same weights, :class:`AaClipBackend` on the same adapters (the two official
files merged into the project's one-file checkpoint), the text-stage features of :mod:`anorefiner.zsad.aa_clip
.model`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from core import official_module, quarter_layers

REPO = "Mwxinnn/AA-CLIP"
COMMIT = "53db195"
PINNED = {
    "test.py": "2af587e183d2083e78213e9688605b2a07d8c295",
    "forward_utils.py": "2f30909638f84729d72c11e46db15efa0460e8ca",
    "utils.py": "facc7cdc7237a0a5c0f3bca01c633c051e1be902",
    "model/adapter.py": "ff8513bcf949f0ba020e6f832ec5f09c6914dd2f",
    "model/adapter_modules.py": "2780d4981526265a5abd46249cff182b9602ddbc",
    "model/clip.py": "ef38e51d1721479fb040a20b58cb454d35b6d7e3",
    "model/model.py": "0b5348c65134ab4bd3ce47ac428d73c632f32b12",
    "model/transformer.py": "afb089d519c1e7979547930db7f075d92bd57e76",
    "model/openai.py": "61f9d3be5ef9296c08297673946b5d87dcfe516d",
    "model/tokenizer.py": "de913b2ef6d89285275c542462906a3476db0591",
    "model/bpe_simple_vocab_16e6.txt.gz": "7b5088a527f720063f044eb928eee315f63b2fc0",
    "model/model_configs/ViT-L-14-336.json": "8d1f74c2639c3a3705df9865b9c08215675ddc97",
    "dataset/__init__.py": "92266856bf249eb5a7cac52f17f7a8813b7350fa",
    "dataset/constants.py": "3739507abb646543b15c8dcb0c48a6e80b665d13",
}
DEFAULTS = {"model": "ViT-L-14-336", "image_size": 112, "class_name": "bottle"}
STAGES = [
    ("preprocessing", "resized, normalised image (squash resize)"),
    ("position_embedding", "visual position embedding at the input grid"),
    ("text_embeddings", "adapted class text [2, D] (normal, abnormal)"),
    ("level_tokens", "adapted, projected, L2-normalised tokens of the 4 levels"),
    ("detection_feature", "mean of the L2-normalised det_proj tokens"),
    ("maps_raw", "sum over levels of bilinear(blur((100 cos_abn + 1 - 100 cos_norm) / 2))"),
    ("detection_scores", "(det . t_abn + 1) / 2"),
    ("maps", "class min-max of the maps"),
    ("scores", "0.5 max(map) + 0.5 det, both min-maxed over the class"),
    ("surgery_features", "text stage: L2(surgery patch tokens) + L2(CLS) at level 24, batch of 3"),
]


def official(root: Path, spec: dict) -> dict:
    import shims

    shims.torchvision_compat()
    shims.stub_missing("cv2", "ipdb")
    shims.pkg_resources_packaging()
    import model.clip as official_clip
    from dataset import BaseSingleClassDataset
    from forward_utils import get_adapted_single_class_text_embedding
    from model.adapter import AdaptedCLIP

    official_clip._MODEL_CKPT_PATHS[spec["model"]] = spec["clip"]
    shims.APPLIED.append("model.clip._MODEL_CKPT_PATHS -> the local CLIP file")
    test = official_module(root, "test.py", "aa_clip_official_test")
    size, work = spec["image_size"], Path(spec["work"])
    clip_model = official_clip.create_model(model_name=spec["model"], img_size=size, device="cpu",
                                            pretrained="openai", require_pretrained=True)
    clip_model.eval()
    torch.manual_seed(spec["seed"])
    model = AdaptedCLIP(clip_model=clip_model, text_adapt_weight=0.1, image_adapt_weight=0.1, text_adapt_until=3,
                        image_adapt_until=6, relu=False).eval()
    text_file, image_file = work / "text_adapter.pth", work / "image_adapter_1.pth"
    torch.save({"epoch": 1, "text_adapter": model.text_adapter.state_dict()}, text_file)  # train.py l.105-113
    torch.save({"epoch": 1, "image_adapter": model.image_adapter.state_dict()}, image_file)  # l.162-173
    model.text_adapter.load_state_dict(torch.load(text_file, weights_only=True)["text_adapter"])  # test.py l.166
    model.image_adapter.load_state_dict(torch.load(image_file, weights_only=True)["image_adapter"])  # l.175-176
    meta = work / "aa_clip_meta.jsonl"
    meta.write_text("".join(json.dumps({"image_path": p, "label": 0, "class_name": spec["class_name"]}) + "\n"
                            for p in spec["images"]))
    data = BaseSingleClassDataset(data_path="/", meta_path=str(meta), img_size=size, class_name=spec["class_name"])
    loader = torch.utils.data.DataLoader(data, batch_size=len(data), shuffle=False)
    text = get_adapted_single_class_text_embedding(model, "MVTec", spec["class_name"], "cpu")  # [D, 2]
    _, _, preds, preds_image, _ = test.get_predictions(model=model, class_text_embeddings=text, test_loader=loader,
                                                       device="cpu", img_size=size, dataset="MVTec")
    pixel = (preds - preds.min()) / (preds.max() - preds.min())  # metrics_eval l.241-252 (max != 1 here)
    image = (preds_image - preds_image.min()) / (preds_image.max() - preds_image.min())
    batch = next(iter(loader))["image"]
    seg, det = model(batch)
    surgery = official_clip.create_model(model_name=spec["model"], img_size=size, device="cpu", pretrained="openai",
                                         require_pretrained=True)
    surgery.eval()
    surgery.visual.DAPM_replace(DPAM_layer=20)  # train.py l.243
    _, patch_features = surgery.encode_image(batch, [6, 12, 18, 24])  # train.py l.75-85, the last level
    cls_token, _ = model.clipmodel.encode_image(batch, [])
    cls_token = cls_token / cls_token.norm(dim=-1, keepdim=True)
    f = surgery.visual.ln_post(patch_features[-1][:, 1:, :]) @ surgery.visual.proj
    f = f / f.norm(dim=-1, keepdim=True) + cls_token.unsqueeze(1)
    return {"preprocessing": batch, "position_embedding": clip_model.visual.positional_embedding.detach(),
            "text_embeddings": text.T, "level_tokens": torch.stack(seg, 1), "detection_feature": det,
            "maps_raw": preds, "detection_scores": preds_image, "maps": pixel,
            "scores": pixel.max(axis=(1, 2)) * 0.5 + image * 0.5, "surgery_features": f,
            "checkpoint": torch.tensor(list(str(work).encode()))}


def ours(spec: dict, official: dict) -> dict:
    from types import SimpleNamespace

    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import load_image
    from anorefiner.zsad.aa_clip import AaClipBackend, AaClipConfig
    from anorefiner.zsad.aa_clip.model import adapted_visual, surgery_start, text_stage_features

    work = Path(bytes(official["checkpoint"].tolist()).decode())
    merged = {part: torch.load(work / f"{name}.pth", weights_only=True)[part]
              for part, name in (("text_adapter", "text_adapter"), ("image_adapter", "image_adapter_1"))}
    torch.save(merged, work / "aa_clip_ours.pt")
    bb = build_backbone(spec["model"], spec["image_size"], layers=quarter_layers(spec["model"]),
                        pretrained=spec["clip_state"])
    images = [load_image(p) for p in spec["images"]]
    config = AaClipConfig(checkpoint=str(work / "aa_clip_ours.pt"), class_name=spec["class_name"],
                          batch_size=len(images))
    backend = AaClipBackend(config, backbone=bb, images=lambda idx: [images[i] for i in idx])
    with torch.no_grad():
        x = bb.preprocess(images)
        seg, det = adapted_visual(bb, backend.adapters, x, backend.levels, 0.1)
        out = backend.score_batch(x)
        result = backend.coarse(SimpleNamespace(ids=[str(i) for i in range(len(images))], layers={}, cls=None))
        full = out["full"].double()
        surgery = text_stage_features(bb, x, 24, surgery_start(24), "batch")
    return {"preprocessing": x, "position_embedding": bb.pos_embed, "text_embeddings": backend.text,
            "level_tokens": torch.stack(seg, 1), "detection_feature": det, "maps_raw": full,
            "detection_scores": out["det"], "maps": (full - full.min()) / (full.max() - full.min()),
            "scores": result.scores, "surgery_features": surgery}
