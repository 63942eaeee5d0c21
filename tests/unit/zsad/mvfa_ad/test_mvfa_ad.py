"""MVFA-AD: the adapted forward, the two maps and the few-shot loss against float64 loops; training and the backend
end to end with the tiny random CLIP."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from anorefiner.backbones import build_backbone
from anorefiner.zsad.mvfa_ad.backend import MvfaAdapters, few_shot_map, preprocess, zero_shot_map
from anorefiner.zsad.mvfa_ad.train import TrainConfig, fewshot_loss

from ..reference import bilinear_align_corners, float64_backbone


@pytest.fixture(scope="module")
def tiny64(tiny_clip):
    return float64_backbone(tiny_clip, 56, seed=4)


def test_adapted_forward_matches_a_block_loop(tiny64):
    torch.manual_seed(0)
    adapters = MvfaAdapters(64, 32, [2, 4]).double()
    x = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        seg, det = adapters(tiny64, x)
        # CLIP_Inplanted.forward (adapter.py l.42-93), literally: residual blocks, adapters after blocks 2 and 4
        v = tiny64.visual
        h = v.ln_pre(tiny64.embed(x))
        want_seg, want_det = [], []
        for i, block in enumerate(tiny64.blocks, start=1):
            h = block(h)
            if i in (2, 4):
                j = [2, 4].index(i)
                s_mid = torch.nn.functional.leaky_relu(h @ adapters.seg_adapters[j].fc1[0].weight.T)
                d_mid = torch.nn.functional.leaky_relu(h @ adapters.det_adapters[j].fc1[0].weight.T)
                s_out = torch.nn.functional.leaky_relu(s_mid @ adapters.seg_adapters[j].fc2[0].weight.T)
                d_out = torch.nn.functional.leaky_relu(d_mid @ adapters.det_adapters[j].fc2[0].weight.T)
                h = 0.8 * h + 0.1 * s_out + 0.1 * d_out
                want_seg.append(s_mid)
                want_det.append(d_mid)
    for a, b in zip(seg + det, want_seg + want_det):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert seg[0].shape == (2, 1 + 16, 32)  # class token kept (the memory holds it too)


def test_maps_match_loops():
    g = torch.Generator().manual_seed(2)
    seg = [torch.randn(2, 1 + 9, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    text = torch.nn.functional.normalize(torch.randn(2, 5, generator=g, dtype=torch.float64), dim=-1)
    memory = [torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    zero, few = zero_shot_map(seg, text, (3, 3), 8, 100.0).numpy(), few_shot_map(seg, memory, (3, 3), 8).numpy()
    for n in range(2):
        want_zero, want_few = np.zeros((8, 8)), np.zeros((8, 8))
        for p, mem in zip(seg, memory):
            tok = p[n, 1:].numpy()
            logits = np.zeros((2, 9))
            dist = np.zeros(9)
            for i in range(9):
                t = tok[i] / np.linalg.norm(tok[i])
                logits[:, i] = 100.0 * (text.numpy() @ t)
                dist[i] = min(1 - t @ (m / np.linalg.norm(m)) for m in mem.numpy())
            up = [bilinear_align_corners(logits[c].reshape(3, 3), 8) for c in range(2)]
            want_zero += np.exp(up[1]) / (np.exp(up[0]) + np.exp(up[1]))
            want_few += bilinear_align_corners(dist.reshape(3, 3), 8)
        np.testing.assert_allclose(zero[n], want_zero, rtol=1e-9)
        np.testing.assert_allclose(few[n], want_few, rtol=1e-9)


def test_few_shot_loss_matches_a_loop():
    g = torch.Generator().manual_seed(3)
    seg = [torch.randn(1, 1 + 4, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    det = [torch.randn(1, 1 + 4, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    text = torch.nn.functional.normalize(torch.randn(2, 5, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.zeros(1, 6, 6, dtype=torch.float64)
    mask[0, 1:3, 2:5] = 1
    label = torch.ones(1, dtype=torch.float64)
    cfg = TrainConfig()
    got = float(fewshot_loss(seg, det, text, mask, label, (2, 2), 6, cfg))
    want, eps = 0.0, cfg.focal_smooth
    m = mask[0].numpy()
    for s, d in zip(seg, det):
        probs = []
        for tok in d[0, 1:].numpy():
            z = 100.0 * text.numpy() @ (tok / np.linalg.norm(tok))
            probs.append(math.exp(z[1]) / np.exp(z).sum())
        x = float(np.mean(probs))  # the mean probability is the BCE's logit (train_few.py l.128-130)
        want += -(1.0 * math.log(1 / (1 + math.exp(-x))))
        logits = np.zeros((2, 4))
        for i, tok in enumerate(s[0, 1:].numpy()):
            logits[:, i] = 100.0 * text.numpy() @ (tok / np.linalg.norm(tok))
        up = [bilinear_align_corners(logits[c].reshape(2, 2), 6) for c in range(2)]
        p1 = np.exp(up[1]) / (np.exp(up[0]) + np.exp(up[1]))
        focal = 0.0
        for i in range(6):
            for j in range(6):
                onehot = np.clip([1 - m[i, j], m[i, j]], eps, 1 - eps)
                pt = onehot[0] * (1 - p1[i, j]) + onehot[1] * p1[i, j] + eps
                focal += -((1 - pt) ** 2) * math.log(pt)
        want += focal / 36
        want += 1 - (2 * (p1 * m).sum() + 1) / (p1.sum() + m.sum() + 1)
    assert got == pytest.approx(want, rel=1e-9)


def test_preprocess_scales_without_normalising_and_crops():
    img = np.full((50, 40, 3), 255, np.uint8)
    x = preprocess([img], 60, 56)
    assert x.shape == (1, 3, 56, 56) and float(x.max()) == pytest.approx(1.0) and float(x.min()) >= 0.0


def test_training_and_backend_end_to_end(tiny_clip, demo_dataset, tmp_path):
    from anorefiner.cache import extract_features, read_features
    from anorefiner.data.index import index_category, load_image
    from anorefiner.zsad import get_backend
    from anorefiner.zsad.mvfa_ad.train import check_checkpoint, train_fewshot
    from anorefiner.zsad.shots import TrainGood

    bb = build_backbone(tiny_clip, 56, pretrained=None, seed=1)
    cfg = TrainConfig(epochs=2, features=[2, 4], image_size=60)
    ck = train_fewshot(bb, demo_dataset, "demo", "tiles", cfg, tmp_path / "m.pt", k_shot=2, seed=1)
    check_checkpoint(ck, bb)
    obj = torch.load(ck, map_location="cpu", weights_only=True)
    assert set(obj) == {"seg_adapters", "det_adapters", "meta"} and "0.fc1.0.weight" in obj["seg_adapters"]
    assert json.loads(obj["meta"]["shots"]) == TrainGood(demo_dataset, "demo", "tiles").draw(2, 1)
    index = index_category(demo_dataset, "tiles", dataset="demo")
    feats = read_features(extract_features(index, bb, tmp_path / "f.h5", batch_size=6))
    paths = list(index[index["split"] == "test"]["image_path"])
    be = get_backend("mvfa_ad", {"class_name": "tiles", "k_shot": 2, "checkpoint": str(ck), "device": "cpu",
                                 "batch_size": 5}, backbone=bb, seed=1)
    be.images = lambda idx: [load_image(paths[i]) for i in idx]
    be.train_images = TrainGood(demo_dataset, "demo", "tiles")
    res = be.coarse(feats)
    assert res.maps.shape == (12, 4, 4) and be.last_info["map_size"] == 60
    # the memory: every token of the 11 views of the 2 shots, class tokens included (train_few.py l.174)
    assert [m.shape for m in be.memory()] == [(2 * 11 * (1 + 16), 32)] * 2
    # each half min-max normalised over the category: maps in [0, 1], some image reaches 1 only if both maxima meet
    assert res.maps.min() >= 0 and res.scores.max() <= 1 and (res.scores >= res.maps.reshape(12, -1).max(1)).all()
    with pytest.raises(ValueError, match="holds 2 shots, the backend wants 4"):
        get_backend("mvfa_ad", {"class_name": "tiles", "k_shot": 4, "checkpoint": str(ck)}, backbone=bb)
    with pytest.raises(ValueError, match=r"feature layers \[6\] are not blocks"):
        train_fewshot(bb, demo_dataset, "demo", "tiles", TrainConfig(features=[6]), tmp_path / "x.pt", k_shot=1,
                      seed=0)
