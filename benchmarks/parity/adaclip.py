"""AdaCLIP parity adapter: ``caoyunkang/AdaCLIP@e27ee32`` against :mod:`anorefiner.zsad.adaclip.backend`.

Official side (unchanged files): ``method.AdaCLIP_Trainer`` builds the CLIP from the seeded random
OpenAI-format file (``create_model``, hence AdaCLIP's own position-embedding resize) and random learnable parts
(seeded; the official init), writes them with its own ``save`` (the official checkpoint format) and reloads
them with ``load``; each image is read as ``dataset/base_dataset.py`` does (PIL, ``convert('RGB')``), through
the trainer's ``preprocess``, one at a time (the official text branch supports batch 1 only), through
``clip_model(image, [class], aggregation=True)`` and ``gaussian_filter(sigma=4)`` (``trainer.evaluation``).
Shims (ours, runtime only): ``download_pretrained`` returns the local file instead of downloading; stubs
for cv2/seaborn/tensorboard (imported by the trainer's plotting and logging helpers, never called here);
``pkg_resources.packaging``; the HSF KMeans gets ``random_state = seed`` (the official one is unseeded, so
its score is not repeatable) and its labels are recorded. ``@torch.cuda.amp.autocast`` is a no-op on CPU.

Ours: ``build_backbone`` with the same file as local weights, :class:`AdaClipBackend` with the official
checkpoint (``load_model``), stage by stage through the backend's own functions. Project choices reported
separately: our seeded KMeans (own labels), and the alternatives ``prompt_precision: float32`` and
``pos_embed: bicubic`` (the effect of the official fp16 prompts and plain-bicubic resize).
"""

from __future__ import annotations

from pathlib import Path

import torch
from core import config_quarters, quarter_layers

REPO = "caoyunkang/AdaCLIP"
COMMIT = "e27ee32"
PINNED = {
    "loss.py": "3ad9f2245b1d5269706d1cf8ef7b0105a23c39a7",
    "method/__init__.py": "32567cd6b0e349663276c5d5601a4fb043fc9951",
    "method/adaclip.py": "df3936ba3ea58345811d25ab50b0a3829a31b19a",
    "method/bpe_simple_vocab_16e6.txt.gz": "36a15856e00a06a9fbed8cdd34d2393fea4a3113",
    "method/clip_model.py": "803ce8ae95819d0b2cf84aa6d20152c4470fac97",
    "method/custom_clip.py": "627c00c2dcdb9744c95cf90082cb74599bd9cdfb",
    "method/simple_tokenizer.py": "0a66286b7d5019c6e221932a813768038f839c91",
    "method/tokenizer.py": "23fcfcbcb4ca051ba5bba7520918693001999282",
    "method/trainer.py": "578faeabf59ac56ee0cf9415fc45e1278d621dc7",
    "method/transformer.py": "f6f66abbe368f440c6c0db5061c89b3497035b8c",
    "method/utils.py": "51e80c5e296b24cae130ab0459baf268e0db7673",
    "model_configs/ViT-B-16.json": "395eea77ec3907c0611531aba63459b193e67b9c",
    "model_configs/ViT-L-14-336.json": "8d1f74c2639c3a3705df9865b9c08215675ddc97",
    "tools/__init__.py": "45bffd4334f882adc291e53b799c450395f57eb5",
    "tools/csv_tools.py": "515084889fc1462f4b444707a42188a3c2e79fac",
    "tools/logger.py": "8dcbe4d498eb7819901066d3e131406d8901563b",
    "tools/metrics.py": "c9f3d5f5aed20191ebe3164a1aca979001365c73",
    "tools/training_tools.py": "1a2793a2ef9b2153b785ffc3e42eb32aab03bd34",
    "tools/visualization.py": "899e413446f3ba3a91f0a80dc67bdf1816639b1f",
}
#: kept in Git LFS: the pointer's blob is pinned above, the object is checked by its sha256 (the same file as
#: OpenAI's and open_clip's BPE vocabulary)
LFS = {"method/bpe_simple_vocab_16e6.txt.gz": "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"}
DEFAULTS = {"model": "ViT-B-16", "image_size": 240, "class_name": "metal-nut"}
STAGES = [
    ("preprocessing", "resized, normalised image"),
    ("position_embedding", "visual position embedding at the input grid"),
    ("block_tokens", "prompted raw patch tokens of the 4 output layers"),
    ("text_embeddings", "prompted, state-averaged text features [2, E]"),
    ("maps", "full-resolution p_abnormal, Gaussian sigma 4"),
    ("scores", "HSF image score with the official KMeans labels"),
]
CHOICES = [
    ("scores_seeded_kmeans", "scores", "our KMeans (random_state = run seed, float64) instead of the official labels"),
    ("maps_fp32_prompts", "maps", "option prompt_precision: float32 (no fp16 rounding of the prompts)"),
    ("scores_fp32_prompts", "scores", "option prompt_precision: float32, image score"),
    ("maps_antialiased_pos", "maps", "option pos_embed: bicubic (the backbone's antialiased resize)"),
    ("scores_antialiased_pos", "scores", "option pos_embed: bicubic, image score"),
]


def official(root: Path, spec: dict) -> dict:
    import shims

    shims.torchvision_compat()
    shims.stub_missing("cv2", "seaborn", "torch.utils.tensorboard")
    shims.pkg_resources_packaging()
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    import method.custom_clip as custom_clip
    from method import AdaCLIP_Trainer

    custom_clip.download_pretrained = lambda cfg, force_hf_hub=False, cache_dir=None: spec["clip"]
    layers, cfg = config_quarters(root / "model_configs" / f"{spec['model']}.json")  # test.py features_list
    torch.manual_seed(spec["seed"])
    trainer = AdaCLIP_Trainer(backbone=spec["model"], feat_list=layers, input_dim=cfg["vision_cfg"]["width"],
                              output_dim=cfg["embed_dim"], learning_rate=0.0, device="cpu",
                              image_size=spec["image_size"], prompting_depth=4, prompting_length=5,
                              prompting_branch="VL", prompting_type="SD", use_hsf=True, k_clusters=20)
    ckpt = spec.get("checkpoint") or str(Path(spec["work"]) / "adaclip_official_checkpoint.pth")
    if not spec.get("checkpoint"):
        trainer.save(ckpt)  # the seeded official initialisation, in the official format
    trainer.load(ckpt)
    model = trainer.clip_model.eval()
    labels: list = []
    kmeans = model.HSF.cluster_performer
    kmeans.random_state = spec["seed"]
    fit_predict = kmeans.fit_predict
    kmeans.fit_predict = lambda data: labels.append(fit_predict(data)) or labels[-1]
    recorded: dict = {}
    encode_image = model.encode_image

    def recording_encode_image(image):
        pooled, tokens, emb = encode_image(image)
        recorded["tokens"] = torch.stack([t[:, 1:] for t in tokens], 1)  # [B, layers, P, W]
        return pooled, tokens, emb

    model.encode_image = recording_encode_image
    model.text_embedding_layer.register_forward_hook(lambda m, a, out: recorded.__setitem__("text", out))
    out = {k: [] for k in ("preprocessing", "block_tokens", "text_embeddings", "maps", "scores", "labels")}
    for path in spec["images"]:
        image = trainer.preprocess(Image.open(path).convert("RGB")).unsqueeze(0)
        amap, score = model(image, [spec["class_name"]], aggregation=True)
        out["preprocessing"].append(image[0])
        out["block_tokens"].append(recorded["tokens"][0])
        out["text_embeddings"].append(recorded["text"][0].T)  # [E, 2] -> [2, E]
        out["maps"].append(torch.from_numpy(gaussian_filter(amap[0].numpy(), sigma=4)))
        out["scores"].append(score[0])
        out["labels"].append(torch.as_tensor(labels[-1]))
    out["position_embedding"] = model.visual.positional_embedding.detach()
    out["checkpoint"] = torch.tensor(list(ckpt.encode()))  # the path, for our side
    return out


def ours(spec: dict, official: dict) -> dict:
    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import load_image
    from anorefiner.zsad.adaclip.backend import (AdaClipBackend, AdaClipConfig, adaclip_forward, hsf, image_probs,
                                         official_map)
    from anorefiner.zsad.adaclip.prompts import frozen_pooled, prompted_text, prompted_visual
    from anorefiner.zsad.maps import gaussian_smooth

    ckpt = bytes(official["checkpoint"].tolist()).decode()
    size = spec["image_size"]
    bb = build_backbone(spec["model"], size, layers=quarter_layers(spec["model"]), pretrained=spec["clip_state"])
    images = [load_image(p) for p in spec["images"]]

    def backend(**options):
        cfg = AdaClipConfig(checkpoint=ckpt, class_name=spec["class_name"], device="cpu", batch_size=1, **options)
        return AdaClipBackend(cfg, backbone=bb, seed=spec["seed"], images=lambda idx: [images[i] for i in idx])

    def maps_scores(b, labels=None):
        maps, scores = [], []
        for i in range(len(images)):
            x = b.backbone.preprocess(images[i : i + 1])
            res = adaclip_forward(b.backbone, b.model, b.bank, x, b.config, b.seed)
            maps.append(gaussian_smooth(official_map(res["logits"], size), 4.0)[0])
            if labels is None:
                scores.append(res["probs"][0, 1])
            else:
                flat = [lg.flatten(2).transpose(1, 2) for lg in res["logits"]]
                fused = hsf(res["feats"], flat, b.config.k_clusters, b.seed, labels=[labels[i].numpy()])
                scores.append(image_probs(res["cls"], res["text"], b.config.temperature, fused,
                                          b.config.hsf_alpha)[0, 1])
        return torch.stack(maps), torch.stack(scores)

    out: dict = {}
    with torch.no_grad():
        main = backend()
        x = main.backbone.preprocess(images)
        out["preprocessing"] = x
        out["position_embedding"] = main.backbone.pos_embed
        tokens, text = [], []
        for i in range(len(images)):
            xi = x[i : i + 1]
            dyn_vis, dyn_txt = main.model.dynamic_prompts(frozen_pooled(main.backbone, xi))
            tokens.append(torch.stack(prompted_visual(main.backbone, main.model, xi, dyn_vis)[0], 1)[0])
            text.append(prompted_text(main.backbone, main.model, main.bank, dyn_txt)[0])
        out["block_tokens"], out["text_embeddings"] = torch.stack(tokens), torch.stack(text)
        out["maps"], out["scores"] = maps_scores(main, labels=official["labels"])
        out["scores_seeded_kmeans"] = maps_scores(main)[1]
        out["maps_fp32_prompts"], out["scores_fp32_prompts"] = maps_scores(backend(prompt_precision="float32"))
        out["maps_antialiased_pos"], out["scores_antialiased_pos"] = maps_scores(backend(pos_embed="bicubic"))
    return out
