"""RareCLIP parity adapter: ``hy28hy/RareCLIP_v1@a8e6d46`` against :mod:`anorefiner.zsad.rareclip.backend`.

Official side (unchanged files): ``rareclip.RareCLIP(args)`` with ``args`` from ``test.py``'s own argument
parser (its ``parser = ...`` block up to ``parse_args`` is executed from the file, then parsed with the
overrides below), so every default is the official one; the vendored ``open_clip`` builds the CLIP from the
seeded random OpenAI-format file; the text adapters (``rareclip.LinearLayer``, seeded default init) are
written in ``train.py``'s format (``{'trainable_linearlayer': ...}``) and loaded by the constructor from
``--load_path``; ``renew_memory()`` then ``process_image_and_update(image)`` per image, in the list order
(images read as ``dataset.py`` does, ``Image.open``, through the model's ``preprocess``). Shims (ours, runtime
only): ``download_pretrained_from_url`` returns the local file; stubs for cv2 (``utils.py`` plots, not
imported here); ``Tensor.to('cuda')`` kept on the CPU. CUDA autocast is a no-op on CPU.

Ours: ``build_backbone`` with the same weights and the union of the text and rarity layers,
:class:`RareClipBackend` with the official checkpoint (``load_adapters``), one :class:`RareStream` fed in the
same list order. Six images, so the stream passes the early (images 1-3) and late weightings. Project choice
reported separately: the backend's own seeded stream order (``random.Random(seed).shuffle``, as ``dataset.py``'s
``random.seed; random.shuffle``) against the list order: the effect of the order itself on the scores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

REPO = "hy28hy/RareCLIP_v1"
COMMIT = "a8e6d46"
PINNED = {
    "rareclip.py": "4a2d5bfe57d5ad57b23d2c1772705d2bae6e7942",
    "sampler.py": "555513b1c9404111cd50a308ba24d19da11a3c17",
    "test.py": "d0412b32c5d3c2cf07a36308a71c844f70921db2",
    "train.py": "f745f6bfea585536a8b5a556102e6c2ebbc80a09",
    "open_clip/__init__.py": "088c86441ec71a241320de79b7b66a6afeb3a049",
    "open_clip/factory.py": "b94aa5329c60c617c0913a80777e30e1b959831f",
    "open_clip/model.py": "b1bf75169ccaaab8405df990c7ec4b3a2561cf31",
    "open_clip/openai.py": "cc4e13e876d6a7a3463b457e62c517cb063b1356",
    "open_clip/pretrained.py": "87e7e527497d643fdf6ac931ac73b6e887a90d0d",
    "open_clip/tokenizer.py": "23fcfcbcb4ca051ba5bba7520918693001999282",
    "open_clip/transform.py": "4d90d4c71f9830a1f81a58f2efbb7e8be3876bb3",
    "open_clip/transformer.py": "1feb55707d316d74926ac8e3462cb4b136e753e4",
    "open_clip/bpe_simple_vocab_16e6.txt.gz": "7b5088a527f720063f044eb928eee315f63b2fc0",
    "open_clip/model_configs/ViT-B-16.json": "395eea77ec3907c0611531aba63459b193e67b9c",
    "open_clip/model_configs/ViT-L-14-336.json": "8d1f74c2639c3a3705df9865b9c08215675ddc97",
}
DEFAULTS = {"model": "ViT-B-16", "image_size": 240, "n_images": 6}
#: --features_list_text 12 16 20 24 and --features_list_rare 6 12 18 24 of ViT-L-14-336, at half depth for ViT-B
LAYERS = {"ViT-L-14-336": ([12, 16, 20, 24], [6, 12, 18, 24]), "ViT-B-16": ([6, 8, 10, 12], [3, 6, 9, 12])}
STAGES = [
    ("preprocessing", "resized, normalised image"),
    ("block_tokens", "raw patch tokens of the text and rarity layers"),
    ("maps", "full-resolution map after the stream step (upsampled, blurred)"),
    ("scores", "max(map) + text probability (re-scored once the stream is long enough)"),
]
CHOICES = [("scores_seeded_stream", "scores", "the backend's seeded stream order instead of the list order")]


def _official_args(root: Path, overrides: list[str]) -> argparse.Namespace:
    """``test.py``'s parser, executed from the file (everything from ``parser = `` to ``args = ``)."""
    text = (root / "test.py").read_text()
    start, end = text.index("    parser = argparse.ArgumentParser"), text.index("    args = parser.parse_args()")
    block = "\n".join(line[4:] for line in text[start:end].splitlines())
    scope = {"argparse": argparse, "root": "./", "exps_name": "default"}
    exec(compile(block, str(root / "test.py"), "exec"), scope)  # noqa: S102 - the official parser, unchanged
    return scope["parser"].parse_args(overrides)


def official(root: Path, spec: dict) -> dict:
    import shims

    shims.torchvision_compat()
    shims.stub_missing("cv2")
    shims.cuda_to_cpu()
    from PIL import Image

    import open_clip
    import open_clip.openai
    import rareclip

    if not Path(open_clip.__file__).resolve().is_relative_to(root):
        raise RuntimeError(f"open_clip imported from {open_clip.__file__}, not the official vendored copy")
    open_clip.openai.download_pretrained_from_url = lambda url, cache_dir=None: spec["clip"]
    text_layers, rare_layers = LAYERS[spec["model"]]
    ckpt = spec.get("checkpoint") or str(Path(spec["work"]) / "rareclip_official_checkpoint.pth")
    if not spec.get("checkpoint"):
        import json

        cfg = json.loads((root / "open_clip" / "model_configs" / f"{spec['model']}.json").read_text())
        torch.manual_seed(spec["seed"])
        linear = rareclip.LinearLayer(cfg["vision_cfg"]["width"], cfg["embed_dim"], len(text_layers))
        torch.save({"trainable_linearlayer": linear.state_dict()}, ckpt)  # train.py's format
    args = _official_args(root, ["--model", spec["model"], "--image_size", str(spec["image_size"]), "--gpu", "-1",
                                 "--seed", str(spec["seed"]), "--load_path", ckpt,
                                 "--features_list_text", *map(str, text_layers),
                                 "--features_list_rare", *map(str, rare_layers)])
    model = rareclip.RareCLIP(args)
    recorded = {}
    encode_image = model.clip_model.encode_image

    def recording_encode_image(image, layers):
        g, tokens = encode_image(image, layers)
        recorded["tokens"] = torch.stack([t[0, 1:] for t in tokens])
        return g, tokens

    model.clip_model.encode_image = recording_encode_image
    model.renew_memory()
    out = {k: [] for k in ("preprocessing", "block_tokens", "maps", "scores")}
    for path in spec["images"]:
        image = model.preprocess(Image.open(path)).unsqueeze(0)
        amap, score = model.process_image_and_update(image, update=bool(args.online))
        out["preprocessing"].append(image[0])
        out["block_tokens"].append(recorded["tokens"])
        out["maps"].append(amap.reshape(amap.shape[-2:]))
        out["scores"].append(score.reshape(()))
    out["checkpoint"] = torch.tensor(list(ckpt.encode()))
    return out


def ours(spec: dict, official: dict) -> dict:
    from types import SimpleNamespace

    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import load_image
    from anorefiner.zsad.rareclip.backend import RareClipBackend, RareClipConfig, RareStream

    ckpt = bytes(official["checkpoint"].tolist()).decode()
    text_layers, rare_layers = LAYERS[spec["model"]]
    union = sorted(set(text_layers) | set(rare_layers))
    size = spec["image_size"]
    bb = build_backbone(spec["model"], size, layers=union, pretrained=spec["clip_state"])
    cfg = RareClipConfig(checkpoint=ckpt, text_layers=tuple(map(str, text_layers)),
                         rare_layers=tuple(map(str, rare_layers)), device="cpu")
    backend = RareClipBackend(cfg, backbone=bb, seed=spec["seed"])
    with torch.no_grad():
        x = bb.preprocess([load_image(p) for p in spec["images"]])
        layers, cls = bb.forward(x)
        maps, prob, g, grid = backend._prepare(layers, cls)
        stream = RareStream(backend.config, grid[0] * grid[1], backend.map_size)
        full, scores = [], []
        for i in range(len(x)):
            f, s = stream.step(maps[i], prob[i], g[i], backend._raw(layers, i), grid)
            full.append(f)
            scores.append(torch.as_tensor(s))
        seeded = backend.coarse(SimpleNamespace(ids=[str(i) for i in range(len(x))], layers=layers, cls=cls))
    n, (h, w) = len(x), grid
    return {"preprocessing": x, "block_tokens": torch.stack([layers[str(k)].reshape(n, h * w, -1) for k in union], 1),
            "maps": torch.stack(full), "scores": torch.stack(scores),
            "scores_seeded_stream": torch.from_numpy(seeded.scores)}
