"""AnomalyCLIP parity adapter: ``zqhang/AnomalyCLIP@45ed4dd`` against :mod:`anorefiner.zsad.anomalyclip.backend`.

Official side (unchanged files): ``AnomalyCLIP_lib.load("ViT-L/14@336px", design_details=...)`` rebuilds the
CLIP from the seeded random OpenAI-format file (QuickGELU, its own bilinear position-embedding resize in the
forward); ``prompt_ensemble.AnomalyCLIP_PromptLearner`` gets the official (seeded) initialisation, is saved in
``train.py``'s format (``{"prompt_learner": state_dict}``) and reloaded as ``test.py`` does; the text, DPAM
(``DAPM_replace(DPAM_layer=20)``), ``encode_image(image, [24], DPAM_layer=20)``, ``compute_similarity``,
``get_similarity_map`` and ``gaussian_filter(sigma=4)`` are the official calls; images are read as
``dataset.py`` does (``Image.open``) through ``utils.get_transform``. The per-image lines of ``test.py``
(l.82-103) are loop code inside ``test()``, restated here on the official functions' outputs. test.py has no
autocast; the compound prompts' ``.half()`` runs as in the official code. Shims (ours, runtime only):
``model_load._download`` returns the local file (the official path is a hard-coded cache folder); a stub
for ``thop`` (a FLOP profiler ``AnomalyCLIP_lib/AnomalyCLIP.py`` imports, not called);
``pkg_resources.packaging``. The official code is written for ViT-L/14@336px only (the tokenizer context and
the 896-d compound projections), so the check runs that architecture at a small input (default 350 px).

Ours: ``build_backbone("ViT-L-14-336", activation="quick_gelu")`` with the same file as local weights and
:class:`AnomalyCLIPBackend` with the official checkpoint (``load_prompt_learner``).
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import torch

REPO = "zqhang/AnomalyCLIP"
COMMIT = "45ed4dd"
PINNED = {
    "AnomalyCLIP_lib/AnomalyCLIP.py": "8a359d961eb8eb497ff25e1b77fa0b5659b7bb88",
    "AnomalyCLIP_lib/__init__.py": "274e95764dc422743a4a9599dd99348eb94d9458",
    "AnomalyCLIP_lib/bpe_simple_vocab_16e6.txt.gz": "7b5088a527f720063f044eb928eee315f63b2fc0",
    "AnomalyCLIP_lib/build_model.py": "5abf74ee9159e5847557f8e645adf35565ab673e",
    "AnomalyCLIP_lib/constants.py": "a670bb3fab442baeb9af53b91c312e6982af57ee",
    "AnomalyCLIP_lib/model_load.py": "c91d4ad619b8503854e0e88800ae3c7fd13146c8",
    "AnomalyCLIP_lib/simple_tokenizer.py": "0a66286b7d5019c6e221932a813768038f839c91",
    "AnomalyCLIP_lib/transform.py": "748884a3c7cb7ece1ca521ca1dbf40bb74855007",
    "prompt_ensemble.py": "564772c3ec87975e41dec91c09626b3195f52f76",
    "utils.py": "f28f094a9c689d2af0111f03c71aaf8d1ceb3ba1",
    "test.py": "6568c2f0cfcd907ae37291be4f4c3f89bf36969d",
    "train.py": "6cc64171ba8cb0d6bb3fb8191db70980c633f915",
}
DEFAULTS = {"model": "ViT-L-14-336", "image_size": 350}
PARAMS = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9, "learnabel_text_embedding_length": 4}
STAGES = [
    ("preprocessing", "resized, normalised image (squash resize)"),
    ("block_tokens", "DPAM-path ln_post + proj features of block 24, L2-normalised"),
    ("text_embeddings", "learned object-agnostic text pair [2, D]"),
    ("maps", "full-resolution map of block 24, Gaussian sigma 4"),
    ("scores", "softmax(cos(g, t) / 0.07)[abnormal]"),
]


def official(root: Path, spec: dict) -> dict:
    import shims

    shims.torchvision_compat()
    shims.stub_missing("thop")
    shims.pkg_resources_packaging()
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    import AnomalyCLIP_lib
    from AnomalyCLIP_lib import model_load
    from prompt_ensemble import AnomalyCLIP_PromptLearner
    from utils import get_transform

    if spec["model"] != "ViT-L-14-336":
        raise ValueError("the official AnomalyCLIP code runs ViT-L/14@336px only")
    model_load._download = lambda url, root=None: spec["clip"]
    model, _ = AnomalyCLIP_lib.load("ViT-L/14@336px", device="cpu", design_details=PARAMS)
    model.eval()
    preprocess, _ = get_transform(Namespace(image_size=spec["image_size"]))
    torch.manual_seed(spec["seed"])
    learner = AnomalyCLIP_PromptLearner(model.to("cpu"), PARAMS)
    ckpt = spec.get("checkpoint") or str(Path(spec["work"]) / "anomalyclip_official_checkpoint.pth")
    if not spec.get("checkpoint"):
        torch.save({"prompt_learner": learner.state_dict()}, ckpt)  # train.py's format
    learner.load_state_dict(torch.load(ckpt, weights_only=True)["prompt_learner"])
    model.visual.DAPM_replace(DPAM_layer=20)
    prompts, tokenized, compound = learner(cls_id=None)
    text = model.encode_text_learn(prompts, tokenized, compound).float()
    text = torch.stack(torch.chunk(text, dim=0, chunks=2), dim=1)
    text = text / text.norm(dim=-1, keepdim=True)
    out = {k: [] for k in ("preprocessing", "block_tokens", "maps", "scores")}
    for path in spec["images"]:
        image = preprocess(Image.open(path)).unsqueeze(0)
        g, patches = model.encode_image(image, [24], DPAM_layer=20)
        g = g / g.norm(dim=-1, keepdim=True)
        out["scores"].append(((g @ text.permute(0, 2, 1)) / 0.07).softmax(-1)[0, 0, 1])
        p = patches[0] / patches[0].norm(dim=-1, keepdim=True)
        sim, _ = AnomalyCLIP_lib.compute_similarity(p, text[0])
        sim_map = AnomalyCLIP_lib.get_similarity_map(sim[:, 1:, :], spec["image_size"])
        amap = (sim_map[..., 1] + 1 - sim_map[..., 0]) / 2.0
        out["maps"].append(torch.from_numpy(gaussian_filter(amap[0].numpy(), sigma=4)))
        out["preprocessing"].append(image[0])
        out["block_tokens"].append(p[0, 1:])
    out["text_embeddings"] = text[0]
    out["checkpoint"] = torch.tensor(list(ckpt.encode()))
    return out


def ours(spec: dict, official: dict) -> dict:
    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import load_image
    from anorefiner.zsad.anomalyclip.backend import AnomalyCLIPBackend, AnomalyCLIPConfig

    ckpt = bytes(official["checkpoint"].tolist()).decode()
    bb = build_backbone(spec["model"], spec["image_size"], layers=["24"], pretrained=spec["clip_state"],
                        activation="quick_gelu")
    backend = AnomalyCLIPBackend(AnomalyCLIPConfig(checkpoint=ckpt, device="cpu"), backbone=bb)
    images = [load_image(p) for p in spec["images"]]
    with torch.no_grad():
        x = bb.preprocess(images)
        res = backend.score_batch(x)
    n, d = len(images), res["feats"]["24"].shape[-1]
    return {"preprocessing": x, "block_tokens": res["feats"]["24"].reshape(n, -1, d),
            "text_embeddings": backend.text, "maps": res["full"], "scores": res["scores"]}
