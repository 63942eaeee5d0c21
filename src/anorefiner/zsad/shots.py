"""Few-shot support sets: the k ``train/good`` images of a category drawn by the run's seed, and the fixed
augmentations MVFA-AD and RegAD apply to them.

Every few-shot row (WinCLIP, PromptAD, MVFA-AD, RegAD; PA-CLIP Tables 1-2 "4-shot") draws its shots with
:meth:`TrainGood.draw`: ``k`` of the category's ``train/good`` images without replacement, from NumPy's
generator seeded with ``[seed, 77]``, so at one seed every few-shot method sees the same k images. The official
code reads fixed lists instead (PromptAD ``datasets/seeds_*/<class>/selected_samples_per_run.txt``, indices into
an unsorted ``glob``; RegAD's ``support_set/<class>/<k>_10.pt``; MVFA-AD ``dataset/fewshot_seed``, medical only),
which do not exist for every dataset here and depend on the file system's listing order.

The augmentations are the official ones (MVFA-AD ``utils.py`` ``augment`` l.79-136; RegAD ``test.py``
l.112-132 with ``utils/funcs.py`` l.28-66): an affine warp is ``grid_sample(x, affine_grid(theta))`` with
reflection padding (``align_corners=False``, PyTorch's default, as the official calls), flips and a
90-degree rotation are exact index permutations (kornia's ``rotate`` by 90 degrees with reflection padding
samples pixel centres exactly on a square image), grey is ``0.299 R + 0.587 G + 0.114 B`` repeated on the
three channels (kornia ``rgb_to_grayscale``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..log import LOG

SHOT_STREAM = 77  # the generator's second key: [seed, 77] (WinCLIP's draw since its first version)


class TrainGood:
    """The ``train/good`` images of one category: seeded draws of k of them, and loading by image id."""

    def __init__(self, root, dataset: str, category: str):
        from ..data.index import index_category

        df = index_category(root, category, dataset=dataset, split="train")
        self.category = category
        self.ids = [str(i) for i in df["image_id"]]
        self.paths = dict(zip(self.ids, (str(p) for p in df["image_path"])))

    def draw(self, k: int, seed: int, what: str = "few-shot") -> list[str]:
        """Ids of ``k`` images drawn without replacement by ``seed`` (sorted in index order)."""
        k = int(k)
        if not 1 <= k <= len(self.ids):
            raise ValueError(f"{what} k_shot={k} but {self.category!r} has {len(self.ids)} train/good images")
        pick = sorted(np.random.default_rng([int(seed), SHOT_STREAM]).choice(len(self.ids), size=k, replace=False))
        ids = [self.ids[i] for i in pick]
        LOG.info("%s %d-shot references (seed %d): %s", what, k, seed, [Path(self.paths[i]).name for i in ids])
        return ids

    def load(self, ids: list[str]) -> list[np.ndarray]:
        """uint8 RGB images of ``ids`` (an id that is not a train/good image of the category is an error)."""
        from ..data.index import load_image

        missing = [i for i in ids if i not in self.paths]
        if missing:
            raise ValueError(f"{self.category!r}: {missing} are not train/good images of the category")
        return [load_image(self.paths[i]) for i in ids]


# ----------------------------------------------------------------------------------------------- augmentation
def affine_warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``grid_sample(x, affine_grid(theta, x.shape))`` with reflection padding; ``theta [B, 2, 3]`` or ``[2, 3]``."""
    theta = theta.to(x.dtype).to(x.device)
    if theta.ndim == 2:
        theta = theta.expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def rotation(angle: float) -> torch.Tensor:
    """``utils/funcs.py`` get_rot_mat: ``[[cos, -sin, 0], [sin, cos, 0]]``."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=torch.float64)


def translation(a: float, b: float) -> torch.Tensor:
    """``utils/funcs.py`` get_translation_mat: ``[[1, 0, a], [0, 1, b]]`` (normalised coordinates)."""
    return torch.tensor([[1.0, 0.0, a], [0.0, 1.0, b]], dtype=torch.float64)


def grey(x: torch.Tensor) -> torch.Tensor:
    """kornia ``rgb_to_grayscale`` repeated on three channels (RegAD ``grey_img``)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).repeat(1, 3, 1, 1)


def augment_mvfa(x: torch.Tensor) -> torch.Tensor:
    """MVFA-AD ``augment`` of normal shots ``[k, 3, H, W]`` -> ``[11 k, 3, H, W]``: the shots, rotations by
    -pi/8, -pi/16, pi/16, pi/8, translations by (+-0.1, +-0.1), a horizontal and a vertical flip, in that order."""
    out = [x] + [affine_warp(x, rotation(a)) for a in (-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8)]
    out += [affine_warp(x, translation(a, b)) for a, b in ((0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))]
    return torch.cat(out + [x.flip(-1), x.flip(-2)], 0)


REGAD_ANGLES = tuple(math.pi * f for f in (-1 / 4, -3 / 16, -1 / 8, -1 / 16, 1 / 16, 1 / 8, 3 / 16, 1 / 4))
REGAD_SHIFTS = ((0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2), (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))


def augment_regad(x: torch.Tensor) -> torch.Tensor:
    """RegAD ``test.py`` support augmentation ``[k, 3, H, W]`` -> ``[22 k, 3, H, W]``: the shots, 8 rotations
    (+-pi/4, +-3pi/16, +-pi/8, +-pi/16), 8 translations, a horizontal flip, grey, and 90/180/270 degrees. (The
    official then shuffles them; only their mean and covariance are used, which the order does not change.)"""
    out = [x] + [affine_warp(x, rotation(a)) for a in REGAD_ANGLES]
    out += [affine_warp(x, translation(a, b)) for a, b in REGAD_SHIFTS]
    out += [x.flip(-1), grey(x)] + [torch.rot90(x, k, dims=(-2, -1)) for k in (1, 2, 3)]
    return torch.cat(out, 0)
