"""WinCLIP parity adapter: anomalib's WinCLIP (PyPI ``anomalib==2.6.0``, whose ``models/image/winclip`` files are
blob-identical to ``open-edge-platform/anomalib@b723368``, the commit specs/backends.md cites) against
:mod:`anorefiner.zsad.winclip.backend`.

``--official`` is a folder holding the ``anomalib`` package: the site-packages of a venv with ``anomalib==2.6.0``
installed, the unpacked wheel, or a clone's ``src/``. anomalib pins ``open-clip-torch>=2.23.0,<2.26.1`` (its
window forward permutes to the sequence-first layout that later open_clip releases dropped), so the official side
runs in its own venv (``--python``); the child refuses another open_clip::

    python3 -m venv /tmp/venv-anomalib
    /tmp/venv-anomalib/bin/pip install anomalib==2.6.0 open-clip-torch==2.24.0
    python benchmarks/parity/run.py winclip --python /tmp/venv-anomalib/bin/python \\
        --official /tmp/venv-anomalib/lib/python3.11/site-packages

Official side (unchanged files): images read by ``anomalib.data.utils.image.read_image`` and transformed by
``WinClip.configure_pre_processor()`` (``lightning_model.py``); ``WinClipModel(scales=(2, 3))`` builds
``ViT-B-16-plus-240`` / ``laion400m_e31`` through open_clip, whose download (``open_clip.factory.download_pretrained``,
shim) returns the seeded random weights in open_clip's own file format; ``model.setup(class_name, reference_images)``
as the Lightning module's ``setup`` calls it; ``model.encode_image`` for the embeddings and ``model(batch)``
(the official forward) for maps and scores, zero-shot and with 2 reference images. The forward's 15x15 map (before
its bilinear upsampling) is read off its ``F.interpolate`` call by an observer that returns the original result.

Ours: ``build_backbone`` with the same file as local weights and :class:`WinClipBackend` (``preprocess``,
``encode``, ``score_batch``); the 240x240 map upsamples ours as anomalib's forward does (bilinear, align_corners
False). Reported separately: the backbone's PIL preprocessing (``resize: pil``, what the backend used before this
check) and the store's 15x15 map upsampled as the metrics do (``resize_maps``, align_corners True).
"""

from __future__ import annotations

from pathlib import Path

import torch
from core import quarter_layers

REPO = "open-edge-platform/anomalib"
COMMIT = "b723368"
PYPI = "anomalib==2.6.0"
WINCLIP = "anomalib/models/image/winclip"
PINNED = {
    f"{WINCLIP}/__init__.py": "f7e6f8cfc9d2457de3f4bbcf45510f73ca94362b",
    f"{WINCLIP}/lightning_model.py": "1a3d85bc6fc90754150ef1cce81db4978af3badd",
    f"{WINCLIP}/torch_model.py": "46349faa59766f779f1bc8e03496ef9abde01dc6",
    f"{WINCLIP}/prompting.py": "ced8cb32208632bd703cbcbe674cd757525902a8",
    f"{WINCLIP}/utils.py": "1c6e61bede47a28e1b8fa23bd515e135f0a7dfed",
    "anomalib/data/utils/image.py": "30688c5f9c4619d03a2282eda6fe0ab792d0fce0",
    "anomalib/pre_processing/pre_processor.py": "607a464b951b50362746d61d66f271fe891bed26",
}
OPEN_CLIP_PIN = ((2, 23, 0), (2, 26, 1))  # anomalib's pyproject: open-clip-torch>=2.23.0,<2.26.1
# 5 images: the first 3 (RGB, greyscale, non-square RGB) are scored, the last 2 are the few-shot references
DEFAULTS = {"model": "ViT-B-16-plus-240", "image_size": 240, "clip_format": "open_clip", "n_images": 5,
            "n_test": 3, "class_name": "metal_nut"}
STAGES = [
    ("preprocessing", "read, resized (float tensor, antialiased bicubic) and normalised test + reference images"),
    ("text_embeddings", "mean of the un-normalised prompt embeddings [2, D], L2-normalised (only cosines use it)"),
    ("image_embeddings", "ln_post(CLS) @ proj of the whole image"),
    ("window_embeddings_2", "2x2 window embeddings (196 windows)"),
    ("window_embeddings_3", "3x3 window embeddings (169 windows)"),
    ("patch_embeddings", "ln_post patch tokens (the few-shot references' space)"),
    ("maps", "zero-shot 15x15 map (harmonic mean of image score and window scales)"),
    ("maps_full", "zero-shot map upsampled to 240 (bilinear)"),
    ("scores", "zero-shot image score"),
    ("maps_fewshot", "2-shot 15x15 map ((zero-shot + few-shot) / 2)"),
    ("scores_fewshot", "2-shot image score"),
]
CHOICES = [
    ("maps_pil", "maps", "zero-shot map from the backbone's PIL preprocessing (resize: pil)"),
    ("scores_pil", "scores", "zero-shot score from the backbone's PIL preprocessing"),
    ("maps_full_from_store", "maps_full", "the stored 15x15 map upsampled as the metrics do (align_corners True)"),
]


def _open_clip_version() -> tuple[int, ...]:
    from open_clip.version import __version__

    return tuple(int(p) for p in __version__.split(".")[:3])


def official(root: Path, spec: dict) -> dict:
    import shims

    shims.torchvision_compat()
    import open_clip.factory
    import torch.nn.functional as F

    low, high = OPEN_CLIP_PIN
    if not low <= _open_clip_version() < high:
        raise RuntimeError(f"open_clip {_open_clip_version()} is outside anomalib's pin >={low},<{high}: run the "
                           f"official side with --python of a venv holding {PYPI} and open-clip-torch==2.24.0")
    import anomalib

    if not Path(anomalib.__file__).resolve().is_relative_to(root):
        raise RuntimeError(f"anomalib imported from {anomalib.__file__}, not from --official {root}")
    from anomalib.data.utils.image import read_image
    from anomalib.models.image.winclip.lightning_model import WinClip
    from anomalib.models.image.winclip.torch_model import WinClipModel

    open_clip.factory.download_pretrained = lambda cfg, cache_dir=None: spec["clip"]
    shims.APPLIED.append("open_clip download -> the local weights file")
    transform = WinClip.configure_pre_processor().transform
    images = torch.stack([transform(read_image(p, as_tensor=True)) for p in spec["images"]])
    images = images.as_subclass(torch.Tensor)  # a plain tensor (torchvision's Image subclass does not torch.load)
    test, refs = images[: spec["n_test"]], images[spec["n_test"]:]
    out = {"preprocessing": images}
    for suffix, reference in (("", None), ("_fewshot", refs)):
        model = WinClipModel(scales=(2, 3), apply_transform=False).eval()
        model.setup(spec["class_name"], reference)  # as WinClip.setup does
        seen = []
        original = F.interpolate

        def observe(x, *args, **kwargs):
            seen.append(x)
            return original(x, *args, **kwargs)

        F.interpolate = observe  # the forward's own call, observed: its input is the 15x15 map
        try:
            result = model(test)
        finally:
            F.interpolate = original
        out[f"maps{suffix}"] = seen[-1][:, 0]
        out[f"scores{suffix}"] = result.pred_score
        if not suffix:
            out["maps_full"] = result.anomaly_map
            out["text_embeddings"] = F.normalize(model.text_embeddings, dim=-1)  # ours keeps it normalised
            with torch.no_grad():
                image, windows, patches = model.encode_image(test)
            out.update(image_embeddings=image, window_embeddings_2=windows[0], window_embeddings_3=windows[1],
                       patch_embeddings=patches)
    return out


def ours(spec: dict, official: dict) -> dict:
    import numpy as np
    import torch.nn.functional as F

    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import load_image
    from anorefiner.metrics.evaluate import resize_maps
    from anorefiner.zsad.winclip.backend import WinClipBackend, WinClipConfig

    size, n_test = spec["image_size"], spec["n_test"]
    images = [load_image(p) for p in spec["images"]]
    bb = build_backbone(spec["model"], size, layers=quarter_layers(spec["model"])[-1:], pretrained=spec["clip_state"])

    def backend(**options):
        return WinClipBackend(WinClipConfig(class_name=spec["class_name"], device="cpu", **options), backbone=bb,
                              reference_images=lambda k, seed: images[n_test:n_test + k])

    zero, few = backend(), backend(k_shot=len(images) - n_test)
    out: dict = {}
    with torch.no_grad():
        x = zero.preprocess(images)
        image, windows, _ = zero.encode(x[:n_test])
        _, _, patches = few.encode(x[:n_test])
        maps, scores = zero.score_batch(x[:n_test])
        out.update(preprocessing=x, text_embeddings=zero.text, image_embeddings=image,
                   window_embeddings_2=windows[0], window_embeddings_3=windows[1], patch_embeddings=patches,
                   maps=maps, scores=scores)
        out["maps_full"] = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        out["maps_fewshot"], out["scores_fewshot"] = few.score_batch(x[:n_test])
        pil = backend(resize="pil")
        out["maps_pil"], out["scores_pil"] = pil.score_batch(pil.preprocess(images[:n_test]))
    out["maps_full_from_store"] = torch.from_numpy(resize_maps(maps.numpy().astype(np.float32), (size, size)))
    return out
