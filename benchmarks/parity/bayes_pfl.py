"""Bayes-PFL parity adapter: ``xiaozhen228/Bayes-PFL@8f155a0`` against :mod:`anorefiner.zsad.bayes_pfl.backend`.

Official side (unchanged files): ``models.model_CLIP.Load_CLIP(size, <OpenAI TorchScript file>)`` (its own
antialiased bicubic position-embedding resize and the extra word embedding), ``models.VPB.Context_Prompting`` with
the official (seeded) initialisation and ``TextEncoder``; the checkpoint is written in ``train.py``'s format
(l.270-271, ``{'MyModel': state_dict}``) and reloaded as ``test.py`` does (l.113-114, strict); images are read as
``datasets.py`` does (``Image.open``) through ``_transform_test`` (``Load_CLIP``'s, the same lines as
``test.py``'s). ``test.py``'s per-image lines
(l.147-165: ``forward_ensemble`` and ``MyModel(...)`` in test mode, stage 2, then the pair softmaxes) and
``calcuate_metric_pixel``'s map and score lines (l.161-189: top-k of the unsmoothed map, ``gaussian_filter``
sigma 8, the class min-max with ``+ 1e-8``, alpha 0.5) are loop code inside functions that also compute metrics
and figures, so they are restated on the official modules' outputs; all images form one class stack, batch 1.

The Monte-Carlo draws: ``torch.randn_like`` (``PFL.py`` reparameterize, the only random call of the test path)
returns, in the official call order, the numbers the project draws from its seed (per image R rows of the
image-specific flow, then R of the normal and R of the abnormal state flow, which the official code keeps from
the first image). Shims (ours, runtime only): ``pkg_resources.packaging``; ``Tensor.to('cuda')`` / ``.cuda()``
kept on the CPU (``PFL.py``'s hard-coded ``is_cuda``, an unused attention sum in ``models/transformer.py``).

Ours: ``build_backbone`` with the same weights, :class:`BayesPflBackend` with the official checkpoint
(``load_model``), ``topk_reference`` set to the input size so that the top-k is the official 2000 pixels.
Project choice reported separately: the top-k scaled to the map size (default ``topk_reference`` 518).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from core import config_quarters, quarter_layers

REPO = "xiaozhen228/Bayes-PFL"
COMMIT = "8f155a0"
PINNED = {
    "test.py": "9d182a9206b79bed49b50b69c85a267d4f65389c",
    "loss.py": "7fc6cb55376a0181719e96637049b530af2efc4e",
    "models/VPB.py": "007166e3b1d733da05b16efa4d67a29640051c51",
    "models/PFL.py": "cc7f888300b531695c09c088ef7d22c07dc2ff0c",
    "models/flows.py": "5a6a33f8c52ffc5da3756e19de3980605decabbb",
    "models/model_CLIP.py": "a556f40aa8a1386f94f0a451e03db19697129183",
    "models/transformer.py": "800c1c942c21169dbc863dd3113e56c88bf53c8f",
    "models/utils.py": "161e59abf9cbd619d08b1f92df6b935b9f52c586",
    "models/simple_tokenizer.py": "75eba4437a2043ef1b258f14cf013db406aa87a2",
    "models/bpe_simple_vocab_16e6.txt.gz": "7b5088a527f720063f044eb928eee315f63b2fc0",
    "models/metric_and_visualization.py": "0ffbf82f3648598966cb8b261ab16923a6405a0a",
    "open_clip_local/model_configs/ViT-B-16.json": "395eea77ec3907c0611531aba63459b193e67b9c",
    "open_clip_local/model_configs/ViT-L-14-336.json": "8d1f74c2639c3a3705df9865b9c08215675ddc97",
}
DEFAULTS = {"model": "ViT-B-16", "image_size": 240, "class_name": "bottle", "sample_num": 3}
STAGES = [
    ("preprocessing", "resized, normalised image (squash resize)"),
    ("position_embedding", "visual position embedding at the input grid"),
    ("block_tokens", "raw tokens of the 4 tapped layers"),
    ("global", "ln_post(CLS) @ proj"),
    ("state_samples", "image-agnostic flow samples z_K (normal, abnormal) [2, R, D]"),
    ("text_embeddings", "Monte-Carlo text [N, 2 R B, D]"),
    ("probs", "mean over the 3R pairs of the stage-2 image softmax"),
    ("maps_unsmoothed", "mean over layers and pairs of the upsampled pair softmax"),
    ("maps", "gaussian_filter(sigma 8) of the maps"),
    ("scores", "0.5 minmax(probs) + 0.5 minmax(mean of the top-2000 pixels)"),
]
CHOICES = [("scores_scaled_topk", "scores", "top-k scaled to the map size (topk_reference 518) instead of 2000 pixels")]


def _noise(seed: int, n: int, r: int, d: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The project's flow noise: the state draws ``[2, R, D]`` and one ``[R, D]`` per image."""
    from anorefiner.seeding import rng

    return (rng(seed, "bayes_pfl", "state").standard_normal((2, r, d)),
            [rng(seed, "bayes_pfl", "image", i).standard_normal((r, d)) for i in range(n)])


def official(root: Path, spec: dict) -> dict:
    import shims

    shims.torchvision_compat()
    shims.pkg_resources_packaging()
    shims.cuda_to_cpu()
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    from models.model_CLIP import Load_CLIP, tokenize
    from models.VPB import Context_Prompting, TextEncoder

    size, r = spec["image_size"], spec["sample_num"]
    layers, cfg = config_quarters(root / "open_clip_local" / "model_configs" / f"{spec['model']}.json")
    args = SimpleNamespace(prompt_num=3, prompt_context_len=5, prompt_state_len=5, num_flows=10, sample_num=r,
                           features_list=layers, image_size=size, vision_width=cfg["vision_cfg"]["width"],
                           text_width=cfg["text_cfg"]["width"], embed_dim=cfg["embed_dim"])
    model_clip, _, preprocess = Load_CLIP(size, spec["clip"], device="cpu")  # model_CLIP._transform_test
    model_clip.eval()
    encoder = TextEncoder(model_clip, args)
    torch.manual_seed(spec["seed"])
    my_model = Context_Prompting(args=args).eval()
    ckpt = spec.get("checkpoint") or str(Path(spec["work"]) / "bayes_pfl_official_checkpoint.pth")
    if not spec.get("checkpoint"):
        torch.save({"MyModel": my_model.state_dict()}, ckpt)  # train.py l.270-271
    my_model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["MyModel"], strict=True)
    state, images = _noise(spec["seed"], len(spec["images"]), r, args.embed_dim)
    queue: list[torch.Tensor] = []
    original = torch.randn_like

    def randn_like(t, *a, **k):  # the project's draws, in the official call order
        return queue.pop(0).to(t.dtype).reshape(t.shape) if queue else original(t, *a, **k)

    torch.randn_like = randn_like
    shims.APPLIED.append("torch.randn_like -> the project's seeded flow noise")
    my_model.zk_n = my_model.zk_a = None  # train.py / test.py reset before a run
    pre, toks, glob, text, probs, maps, tops = [], [], [], [], [], [], []
    for i, path in enumerate(spec["images"]):
        image = preprocess(Image.open(path)).unsqueeze(0)
        queue[:] = [torch.from_numpy(e)[None].float() for e in (*images[i], *state[0], *state[1])]
        image_features, _, patch_tokens = model_clip.encode_image(image, layers)
        t, _ = my_model.forward_ensemble(encoder, image_features, patch_tokens, [spec["class_name"]], "cpu",
                                         tokenize, mode="test")
        pro_img, maps_list = my_model(t, image_features, patch_tokens, stage=2, mode="test")
        pro_img = pro_img.squeeze(2)
        n = args.prompt_num * args.sample_num
        probs.append(sum(torch.cat([pro_img[:, j].unsqueeze(0), pro_img[:, j + n].unsqueeze(0)], dim=1)
                         .softmax(dim=-1)[0, 1] for j in range(n)) / n)
        per = [torch.softmax(torch.stack([m[:, j], m[:, j + n]], dim=1), dim=1)[:, 1].numpy()
               for m in maps_list for j in range(n)]
        maps.append(np.mean(per, axis=0)[0])
        pre.append(image[0])
        toks.append(torch.stack(patch_tokens, 1)[0])
        glob.append(image_features[0])
        text.append(t[0])
    maps = np.stack(maps)
    k = -20 if spec["class_name"] in ("capsules", "macaroni1", "macaroni2", "pipe_fryum", "screw", "cashew",
                                      "chewinggum") else -2000
    tops = np.array([np.mean(np.partition(m.reshape(-1), kth=k)[k:]) for m in maps])
    probs = torch.stack(probs).numpy()
    p_n = (probs - probs.min()) / (probs.max() - probs.min() + 1e-8)
    t_n = (tops - tops.min()) / (tops.max() - tops.min() + 1e-8)
    return {"preprocessing": torch.stack(pre), "position_embedding": model_clip.visual.positional_embedding.detach(),
            "block_tokens": torch.stack(toks), "global": torch.stack(glob),
            "state_samples": torch.stack([my_model.zk_n, my_model.zk_a]), "text_embeddings": torch.stack(text),
            "probs": probs, "maps_unsmoothed": maps, "maps": gaussian_filter(maps, sigma=8, axes=(1, 2)),
            "scores": 0.5 * p_n + 0.5 * t_n, "checkpoint": torch.tensor(list(ckpt.encode()))}


def ours(spec: dict, official: dict) -> dict:
    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import load_image
    from anorefiner.zsad.bayes_pfl.backend import (BayesPflBackend, BayesPflConfig, full_map, monte_carlo_text,
                                                   pair_probs)
    from anorefiner.zsad.maps import gaussian_smooth

    ckpt = bytes(official["checkpoint"].tolist()).decode()
    size, r = spec["image_size"], spec["sample_num"]
    bb = build_backbone(spec["model"], size, layers=quarter_layers(spec["model"]), pretrained=spec["clip_state"])
    opts = dict(checkpoint=ckpt, class_name=spec["class_name"], sample_num=r, batch_size=len(spec["images"]))
    backend = BayesPflBackend(BayesPflConfig(topk_reference=size, **opts), backbone=bb, seed=spec["seed"])
    m = backend.model
    with torch.no_grad():
        x = bb.preprocess([load_image(p) for p in spec["images"]])
        layers, cls = bb.forward(x)
        n, (h, w) = len(x), bb.grid
        toks = [layers[k].reshape(n, h * w, -1) for k in bb.layers]
        g = bb.image_embedding(cls, normalize=False).float()
        _, eps = _noise(spec["seed"], n, r, g.shape[1])
        text = monte_carlo_text(m, bb, backend.tokens, g, torch.from_numpy(np.stack(eps)).float(), backend.state_z)
        full = full_map(m, text, toks, (h, w), size)
        feats = SimpleNamespace(ids=[str(i) for i in range(n)], layers=layers, cls=cls)
        scaled = BayesPflBackend(BayesPflConfig(**opts), backbone=bb, seed=spec["seed"]).coarse(feats).scores
    return {"preprocessing": x, "position_embedding": bb.pos_embed, "block_tokens": torch.stack(toks, 1),
            "global": g, "state_samples": torch.stack(backend.state_z), "text_embeddings": text,
            "probs": pair_probs(m.image_logits(text, g, toks)).mean(1), "maps_unsmoothed": full,
            "maps": gaussian_smooth(full.double(), 8.0), "scores": backend.coarse(feats).scores,
            "scores_scaled_topk": scaled}
