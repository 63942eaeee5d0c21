"""SeaS (Dai et al., ICCV 2025): few-shot anomaly image generation with Separation and Sharing fine-tuning of
Stable Diffusion, as the pseudo-anomaly source of AnoRefiner Table 5 row (c). docs/seas.md.

Re-implemented from the authors' code, HUST-SLOW/SeaS at commit 4645d3bda982855388bfc46fd1ceebc66b48c3f7 (the
repository the SeaS paper links, arXiv 2410.14987): :mod:`.data` (which images, batches), :mod:`.sd` (Stable
Diffusion components and the quantities SeaS reads out of them), :mod:`.losses`, :mod:`.rmp` (mask head),
:mod:`.train` (rule ``train_seas``), :mod:`.generate` (PGT's synthesis source), :mod:`.fetch` (the pinned
weights), :mod:`.tiny` (a tiny random model for tests). Needs the optional extra ``[seas]`` (diffusers,
transformers).
"""

from .config import SeaSConfig

__all__ = ["SeaSConfig"]
