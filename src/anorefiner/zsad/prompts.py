"""Text side of the CLIP backends: prompt ensembles and their per-class cache.

A prompt set is (normal states, abnormal states, templates, ensembling rule). Each state phrase is
filled with the class name and every template is filled with the phrase; the sentences of one
state group are encoded by the backbone's text tower and combined into one vector per group:

* ``"normalized_mean"`` (APRIL-GAN ``prompt_ensemble.py``; specs/backends.md section 1, "Text"):
  L2-normalise every sentence embedding, average, L2-normalise again.
* ``"raw_mean"`` (WinCLIP as anomalib implements it, ``prompting.py`` + ``torch_model.py``;
  specs/backends.md section 4): average the un-normalised embeddings; the cosine in the class
  scores normalises later, so the result is L2-normalised here (the same cosine).

:func:`text_embeddings` returns ``[2, D]`` (row 0 normal, row 1 abnormal) and caches it once per
(model identity, class name, prompt set) as an ``.npz`` under ``cache_dir`` (the workflow uses
``results/text``), written atomically and keyed by a hash of everything that determines it, so a
category's text is never recomputed per image or per job.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_path
from ..log import LOG

# APRIL-GAN prompt_ensemble.py (specs/backends.md section 1): 7 normal / 5 abnormal states, 35 templates.
APRIL_NORMAL = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                "{} without damage")
APRIL_ABNORMAL = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
APRIL_TEMPLATES = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "a low resolution photo of a {}.",
    "a photo of a large {}.", "a blurry photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.", "this is one {} in the scene.",
)
# WinCLIP in anomalib prompting.py (specs/backends.md section 4): no "broken"; 21 templates with
# "a jpeg corrupted photo of the {}." twice (kept: it weighs that template double in the mean).
WINCLIP_ABNORMAL = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
WINCLIP_TEMPLATES = (
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.",
    "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.",
    "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)
ENSEMBLES = ("normalized_mean", "raw_mean")
TEXT_CHUNK = 64  # sentences per text-tower call (bounds CPU memory; the result does not depend on it)


@dataclass(frozen=True)
class PromptSet:
    name: str
    normal: tuple[str, ...]
    abnormal: tuple[str, ...]
    templates: tuple[str, ...]
    ensemble: str

    def sentences(self, class_name: str) -> tuple[list[str], list[str]]:
        """All normal and abnormal sentences for ``class_name`` (states outer, templates inner)."""
        if not isinstance(class_name, str) or not class_name.strip():
            raise ValueError(f"prompt set {self.name!r}: no class name to fill the prompts with (got {class_name!r})")
        fill = lambda states: [t.format(s.format(class_name)) for s in states for t in self.templates]  # noqa: E731
        return fill(self.normal), fill(self.abnormal)


PROMPT_SETS = {
    "april_gan": PromptSet("april_gan", APRIL_NORMAL, APRIL_ABNORMAL, APRIL_TEMPLATES, "normalized_mean"),
    "winclip": PromptSet("winclip", APRIL_NORMAL, WINCLIP_ABNORMAL, WINCLIP_TEMPLATES, "raw_mean"),
}


def get_prompt_set(name: str) -> PromptSet:
    try:
        return PROMPT_SETS[name]
    except KeyError:
        raise ValueError(f"unknown prompt set {name!r}; known: {', '.join(PROMPT_SETS)}") from None


def ensemble(embeddings: torch.Tensor, rule: str) -> torch.Tensor:
    """``[S, D]`` sentence embeddings of one state group -> one L2-normalised ``[D]`` vector."""
    e = embeddings.float()
    if rule == "normalized_mean":
        e = e / e.norm(dim=-1, keepdim=True)
    elif rule != "raw_mean":
        raise ValueError(f"ensemble rule {rule!r} is not one of {ENSEMBLES}")
    m = e.mean(0)
    return m / m.norm()


def encode_raw(backbone, sentences: list[str]) -> torch.Tensor:
    """Un-normalised text embeddings ``[S, D]`` (float32, CPU), in chunks of :data:`TEXT_CHUNK`."""
    out = [torch.as_tensor(backbone.encode_text(sentences[i : i + TEXT_CHUNK], normalize=False)).float().cpu()
           for i in range(0, len(sentences), TEXT_CHUNK)]
    return torch.cat(out, 0)


def cache_key(backbone, class_name: str, prompt_set: PromptSet) -> str:
    ident = backbone.identity
    what = {"backbone": ident.get("backbone"), "weights": ident.get("weights"), "activation": ident.get("activation"),
            "class_name": class_name, "prompts": [prompt_set.normal, prompt_set.abnormal, prompt_set.templates],
            "ensemble": prompt_set.ensemble}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def text_embeddings(backbone, class_name: str, prompt_set: str | PromptSet = "april_gan",
                    cache_dir: str | Path | None = None) -> torch.Tensor:
    """``[2, D]`` L2-normalised (normal, abnormal) ensemble embeddings of ``class_name``.

    With ``cache_dir`` the result is read from / written to
    ``<cache_dir>/<prompt set>/<class name>-<key>.npz`` (key: hash of model identity, class name
    and prompts), so every job and image of a category reuses one computation.
    """
    ps = get_prompt_set(prompt_set) if isinstance(prompt_set, str) else prompt_set
    normal, abnormal = ps.sentences(class_name)
    path = None
    if cache_dir is not None:
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in class_name)
        path = Path(cache_dir) / ps.name / f"{safe}-{cache_key(backbone, class_name, ps)}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return torch.from_numpy(z["text"].astype(np.float32))
    with torch.no_grad():
        emb = encode_raw(backbone, normal + abnormal)
    text = torch.stack([ensemble(emb[: len(normal)], ps.ensemble), ensemble(emb[len(normal):], ps.ensemble)])
    if path is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a handle: np.savez would append ".npz"
            np.savez(fh, text=text.numpy(), class_name=np.array(class_name), prompt_set=np.array(ps.name))
        LOG.info("text embeddings of %r (%s, %d+%d sentences) -> %s", class_name, ps.name, len(normal),
                 len(abnormal), path)
    return text
