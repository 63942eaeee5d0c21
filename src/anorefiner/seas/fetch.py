"""The Stable Diffusion weights SeaS fine-tunes, fetched once from the model hub at a pinned commit and verified
(rule ``sd_weights``, a local job on the login node; compute jobs then read the folder offline).

SeaS fine-tunes Stable Diffusion v1.4 (HUST-SLOW/SeaS README "Stable-Diffusion-v1-4", ``configs/seas.yaml``
L11). The hub's tree API at the pinned commit gives each file's git blob id and, for files stored with Git LFS,
the SHA-256 of the content; every file is downloaded from that commit with the project's resuming downloader and
checked against them before the folder is published (written to ``<out>.partial``, then renamed).
``fetch.json`` in the folder records the repository, commit and checksums. Only the parts SeaS loads are
fetched (no safety checker, no EMA or half-precision variants). A folder you already have (diffusers layout)
needs none of this: set ``seas.weights`` to it.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HUB = "https://huggingface.co"


@dataclass(frozen=True)
class HubModel:
    repo: str
    revision: str  # a full commit id: the tree, and with it every checksum, is fixed
    files: tuple[str, ...]


SD_FILES = ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
            "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors")
#: name -> pinned source; rule sd_weights writes resources/weights/<name>/<revision>/
PINNED = {"stable-diffusion-v1-4": HubModel("CompVis/stable-diffusion-v1-4",
                                            "133a221b8aa7292a167afc5127cb63fb5005638b", SD_FILES)}


def pinned(name: str) -> HubModel:
    try:
        return PINNED[name]
    except KeyError:
        raise ValueError(f"no pinned diffusion model {name!r} (known: {sorted(PINNED)}); give a local folder "
                         "in diffusers layout as seas.weights instead") from None


def cache_dir(name: str, cache: str | Path = "resources/weights") -> Path:
    """Where rule ``sd_weights`` puts the pinned model ``name``."""
    return Path(cache) / name / pinned(name).revision


def _json(url: str, options):
    request = urllib.request.Request(url, headers={"User-Agent": options.user_agent, "Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=options.timeout_s) as response:
        return json.loads(response.read().decode())


def listing(model: HubModel, endpoint: str, options) -> dict[str, dict]:
    """``{path: {"size", "git_blob", "sha256" (LFS files)}}`` of the folders holding ``model.files``."""
    out = {}
    for folder in sorted({str(Path(f).parent) for f in model.files}):
        sub = "" if folder == "." else f"/{folder}"
        for entry in _json(f"{endpoint}/api/models/{model.repo}/tree/{model.revision}{sub}", options):
            if entry.get("type") == "file":
                lfs = entry.get("lfs") or {}
                out[entry["path"]] = {"size": int(entry["size"]), "git_blob": entry["oid"],
                                      **({"sha256": lfs["oid"]} if lfs else {})}
    return out


def verify(path: Path, expected: dict) -> None:
    """The content's SHA-256 (LFS files) or git blob id (the others), and its size."""
    from ..data.download import ChecksumError
    from ..io import sha256_file
    from ..zsad.checkpoints import git_blob_id

    if path.stat().st_size != expected["size"]:
        raise ChecksumError(f"{path}: {path.stat().st_size} bytes, the pinned tree says {expected['size']}")
    if "sha256" in expected:
        actual, want = sha256_file(path, label=path.name), expected["sha256"]
    else:
        actual, want = git_blob_id(path), expected["git_blob"]
    if actual != want:
        raise ChecksumError(f"{path}: checksum {actual}, the pinned tree says {want}")


def fetch_model(model: HubModel, out: str | Path, options=None, endpoint: str | None = None) -> Path:
    """Download and verify ``model.files`` into the folder ``out`` (kept if it exists); returns ``out``."""
    from ..data.download import DownloadOptions, download_partial
    from ..log import LOG

    out = Path(out)
    if (out / "fetch.json").is_file():
        return out
    options = options or DownloadOptions()
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or HUB).rstrip("/")
    tree = listing(model, endpoint, options)
    missing = [f for f in model.files if f not in tree]
    if missing:
        raise FileNotFoundError(f"{model.repo} at {model.revision} has no {missing}")
    partial = out.with_name(out.name + ".partial")
    record = {"repo": model.repo, "revision": model.revision, "endpoint": endpoint, "files": {}}
    hint = (f"Download {model.repo} at revision {model.revision} yourself (diffusers layout) and set the config key "
            "seas.weights to its folder.")
    for name in model.files:
        dest = partial / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.is_file():
            part = download_partial(f"{endpoint}/{model.repo}/resolve/{model.revision}/{name}",
                                    dest.with_name(dest.name + ".partial"), options, hint)
            try:
                verify(part, tree[name])
            except Exception:
                part.unlink()
                raise
            os.replace(part, dest)
        record["files"][name] = tree[name]
        LOG.info("verified %s (%d bytes)", name, tree[name]["size"])
    (partial / "fetch.json").write_text(json.dumps(record, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    LOG.info("%s at %s -> %s", model.repo, model.revision, out)
    return out
