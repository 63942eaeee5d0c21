"""RegAD's networks (``MediaBrain-SJTU/RegAD@5e2c1f8`` ``models/stn.py``, ``models/siamese.py``).

* :class:`StnResNet`: the first three stages of an (ImageNet) ResNet-18, each followed by a spatial transformer
  (``STNModule``: two conv3x3 + BN + ReLU + max-pool layers, ``Linear(16 s^2, 1024) + ReLU + Linear(1024, n)``
  with the last layer's weights zero and its bias the identity transform, so training starts from the identity).
  The forward returns the third stage's transformed features; for the Gaussian it also keeps each stage's
  features warped back by the inverse transforms (``stn1_output`` ... ``stn3_output``, stn.py l.245-274);
* :class:`Encoder` (three 1x1 conv + BN, ReLU between) and :class:`Predictor` (two 1x1 conv, BN + ReLU between):
  the Siamese heads of the registration loss (SimSiam's, siamese.py).

Module and parameter names follow the official ones, so a state dict of either loads into the other. The
``s`` of each STN's first linear layer is computed from the input size (the official hard-codes 56 // (4 i),
i.e. 224-px inputs).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..shots import affine_warp

#: stn.py N_PARAMS: parameters of each transform family, and the identity they start from (the bias)
STN_MODES = {"affine": (1, 0, 0, 0, 1, 0), "translation": (0, 0), "rotation": (0,), "scale": (1, 1), "shear": (0, 0),
             "rotation_scale": (0, 1, 1), "translation_scale": (0, 0, 1, 1), "rotation_translation": (0, 0, 0),
             "rotation_translation_scale": (0, 0, 0, 1, 1)}


def theta_of(mode: str, p: torch.Tensor) -> torch.Tensor:
    """``STNModule.forward`` l.98-147: the ``[B, 2, 3]`` affine matrix of parameters ``p [B, n]``. Note that the
    official ``*_scale`` modes multiply only the diagonal (``cos a x s``), not the sine terms."""
    if mode == "affine":
        return p.view(-1, 2, 3)
    b = p.shape[0]
    one, zero = torch.ones(b, dtype=p.dtype, device=p.device), torch.zeros(b, dtype=p.dtype, device=p.device)
    a00, a01, a02, a10, a11, a12 = one, zero, zero, zero, one, zero
    if mode in ("rotation", "rotation_scale", "rotation_translation", "rotation_translation_scale"):
        c, s = torch.cos(p[:, 0]), torch.sin(p[:, 0])
        a00, a01, a10, a11 = c, -s, s, c
        if mode == "rotation_scale":
            a00, a11 = c * p[:, 1], c * p[:, 2]
        elif mode == "rotation_translation":
            a02, a12 = p[:, 1], p[:, 2]
        elif mode == "rotation_translation_scale":
            a02, a12, a00, a11 = p[:, 1], p[:, 2], c * p[:, 3], c * p[:, 4]
    elif mode == "translation":
        a02, a12 = p[:, 0], p[:, 1]
    elif mode == "scale":
        a00, a11 = p[:, 0], p[:, 1]
    elif mode == "shear":
        a01, a10 = p[:, 0], p[:, 1]
    elif mode == "translation_scale":
        a02, a12, a00, a11 = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    else:
        raise ValueError(f"regad: unknown stn_mode {mode!r}; known: {', '.join(STN_MODES)}")
    return torch.stack([torch.stack([a00, a01, a02], 1), torch.stack([a10, a11, a12], 1)], 1)


def inverse(theta: torch.Tensor) -> torch.Tensor:
    """``[B, 2, 3]`` -> the first two rows of the inverse of ``[[theta], [0, 0, 1]]`` (stn.py l.254-255)."""
    last = torch.tensor([0.0, 0.0, 1.0], dtype=theta.dtype, device=theta.device).expand(theta.shape[0], 1, 3)
    return torch.linalg.inv(torch.cat([theta, last], 1))[:, :2]


class STNModule(nn.Module):
    def __init__(self, channels: int, size: int, mode: str):
        super().__init__()
        if mode not in STN_MODES:
            raise ValueError(f"regad: unknown stn_mode {mode!r}; known: {', '.join(STN_MODES)}")
        self.mode = mode
        self.conv = nn.Sequential(nn.Conv2d(channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1), nn.Conv2d(64, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        side = math.ceil(math.ceil(size / 2) / 2)  # two stride-2 max-pools with padding 1
        self.fc = nn.Sequential(nn.Linear(16 * side * side, 1024), nn.ReLU(True), nn.Linear(1024, len(STN_MODES[mode])))
        with torch.no_grad():
            self.fc[2].weight.zero_()
            self.fc[2].bias.copy_(torch.tensor(STN_MODES[mode], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = theta_of(self.mode, self.fc(self.conv(x).flatten(1)))
        return affine_warp(x, theta), theta


class StnResNet(nn.Module):
    """conv1 .. layer3 of a torchvision ResNet-18 (copied, trainable) with an STN after each stage."""

    def __init__(self, resnet: nn.Module, image_size: int, mode: str = "rotation_scale"):
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"):
            setattr(self, name, copy.deepcopy(getattr(resnet, name)))
        self.requires_grad_(True)
        side = math.ceil(image_size / 4)  # after the stride-2 conv and max-pool (224 -> 56)
        widths = [self.layer1[-1].conv2.out_channels, self.layer2[-1].conv2.out_channels,
                  self.layer3[-1].conv2.out_channels]
        self.stn1 = STNModule(widths[0], side, mode)
        self.stn2 = STNModule(widths[1], math.ceil(side / 2), mode)
        self.stn3 = STNModule(widths[2], math.ceil(side / 4), mode)
        self.widths = widths

    def forward(self, x: torch.Tensor, registered: bool = False):
        """``[B, 3, S, S]`` -> the transformed stage-3 features; with ``registered`` also the three stages'
        features warped back to the input frame (``stn{1,2,3}_output``, detached as the official)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        thetas, feats = [], []
        for layer, stn in ((self.layer1, self.stn1), (self.layer2, self.stn2), (self.layer3, self.stn3)):
            x, theta = stn(layer(x))
            thetas.append(theta)
            feats.append(x)
        if not registered:
            return x
        back = []
        for i, f in enumerate(feats):
            f = f.detach()
            for theta in reversed(thetas[: i + 1]):  # stn3_output = fix(fix(fix(out, inv3), inv2), inv1)
                f = affine_warp(f, inverse(theta.detach()))
            back.append(f)
        return x, back


class Encoder(nn.Module):
    """siamese.py Encoder (``bn3``/``relu3`` exist there but are unused in the forward: kept for the keys)."""

    def __init__(self, channels: int = 256):
        super().__init__()
        for i in (1, 2, 3):
            setattr(self, f"conv{i}", nn.Conv2d(channels, channels, 1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(channels))
            setattr(self, f"relu{i}", nn.ReLU())

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.conv3(x)


class Predictor(nn.Module):
    """siamese.py Predictor (``relu2`` unused, as there)."""

    def __init__(self, channels: int = 256):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(channels, channels, 1, bias=False), nn.ReLU()

    def forward(self, x):
        return self.conv2(self.relu1(self.bn1(self.conv1(x))))


def cos_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``losses/norm_loss.py`` CosLoss (Mean=True): ``-cos(p, stopgrad(z))`` over channels, averaged."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def networks(backbone, image_size: int = 224, stn_mode: str = "rotation_scale", seed: int = 668) -> dict:
    """``{"STN", "ENC", "PRED"}`` from the backbone's (ImageNet) ResNet-18 stages; new layers drawn from ``seed``."""
    if getattr(backbone, "name", None) != "resnet18":
        raise ValueError(f"regad needs the resnet18 backbone (its stages start the network), got "
                         f"{getattr(backbone, 'name', backbone)!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        stn = StnResNet(backbone.model, int(image_size), stn_mode)
        return {"STN": stn, "ENC": Encoder(stn.widths[-1]), "PRED": Predictor(stn.widths[-1])}


def load_networks(path, backbone) -> tuple[dict[str, nn.Module], dict, dict]:
    """``(networks, meta, training options)`` of a checkpoint (rule train_fewshot), every key and shape checked."""
    import json

    from ..checkpoints import load_weights_only

    obj = load_weights_only(path, "regad checkpoint")
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(obj.get(k), dict) for k in ("STN", "ENC", "PRED")):
        raise ValueError(f"regad checkpoint {path}: needs 'STN', 'ENC', 'PRED' and 'meta'")
    trained = json.loads(meta["train_config"])
    nets = networks(backbone, trained["image_size"], trained["stn_mode"], trained["seed"])
    for key, net in nets.items():
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in obj[key].items()}
        if got != expected:
            diff = sorted(set(got.items()) ^ set(expected.items()))[:4]
            raise ValueError(f"regad checkpoint {path}: {key} does not fit the network (first differences {diff})")
        net.load_state_dict(obj[key])
    trained_on = meta.get("trained_on")
    return nets, dict(meta, trained_on=json.loads(trained_on) if isinstance(trained_on, str) else trained_on), trained
