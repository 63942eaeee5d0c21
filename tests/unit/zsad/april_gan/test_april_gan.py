"""APRIL-GAN: map, score and losses against float64 loops; checkpoints; training; the backend end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anorefiner.backbones import build_backbone
from anorefiner.cache import extract_features, read_features
from anorefiner.data.index import index_category
from anorefiner.zsad import get_backend
from anorefiner.zsad.april_gan.backend import (CHECKPOINT_KEY, LinearAdapters, full_map, image_scores, layer_logits,
                                       load_adapters, patch_map)
from anorefiner.zsad.april_gan.train import (TrainConfig, dice_loss, focal_loss, mosaic, train_adapters,
                                             training_samples)

from ..reference import bilinear_align_corners




def _reference_map(tokens, weights, biases, text, size, grid, temp=100.0):
    """Per image, layer, patch: Linear, L2 norm, 100 * p.t, upsample, softmax, abnormal, sum; float64."""
    n = tokens[0].shape[0]
    h, w = grid
    full = np.zeros((n, size, size))
    for b in range(n):
        for tok, wt, bs in zip(tokens, weights, biases):
            logit = np.zeros((2, h, w))
            for k in range(h * w):
                p = wt @ tok[b, k] + bs
                p = p / np.sqrt((p * p).sum())
                for c in range(2):
                    logit[c, k // w, k % w] = temp * (p * text[c]).sum()
            up = np.stack([bilinear_align_corners(logit[c], size) for c in range(2)])
            full[b] += np.exp(up[1]) / (np.exp(up[0]) + np.exp(up[1]))
    cell = size // h
    patch = np.zeros((n, h, w))
    for b in range(n):
        for i in range(h):
            for j in range(w):
                patch[b, i, j] = full[b, i * cell : (i + 1) * cell, j * cell : (j + 1) * cell].mean()
    return full, patch


def test_map_and_score_match_the_float64_loop():
    g = torch.Generator().manual_seed(0)
    n, h, w, cin, d, size = 2, 3, 3, 6, 4, 9
    adapters = LinearAdapters(cin, d, 2).double()
    tokens = [torch.randn(n, h * w, cin, generator=g, dtype=torch.float64) for _ in range(2)]
    text = torch.nn.functional.normalize(torch.randn(2, d, generator=g, dtype=torch.float64), dim=-1) * 0.05
    logits = [layer_logits(p, text, (h, w), 100.0) for p in adapters(tokens)]
    full = full_map(logits, size)
    ref_full, ref_patch = _reference_map([t.numpy() for t in tokens], [f.weight.detach().numpy() for f in adapters.fc],
                                         [f.bias.detach().numpy() for f in adapters.fc], text.numpy(), size, (h, w))
    np.testing.assert_allclose(full.detach().numpy(), ref_full, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(patch_map(full, (h, w)).detach().numpy(), ref_patch, rtol=1e-9, atol=1e-10)
    assert 0 <= full.min() and full.max() <= 2  # a sum of 2 probabilities

    glob = torch.randn(3, d, generator=g, dtype=torch.float64)
    got = image_scores(glob, text, 100.0).numpy()
    for i in range(3):
        gi = glob[i].numpy() / np.linalg.norm(glob[i].numpy())
        tt = text.numpy() / np.linalg.norm(text.numpy(), axis=1, keepdims=True)
        z = 100 * tt @ gi
        assert got[i] == pytest.approx(np.exp(z[1]) / np.exp(z).sum(), rel=1e-5)


def test_focal_and_dice_match_loops():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64), dim=1)
    target = (torch.rand(2, 4, 5, generator=g) > 0.6).double()
    total, count = 0.0, 0
    for b in range(2):
        for i in range(4):
            for j in range(5):
                t = int(target[b, i, j])
                onehot = [min(max(float(c == t), 1e-5), 1 - 1e-5) for c in range(2)]
                pt = sum(onehot[c] * float(probs[b, c, i, j]) for c in range(2)) + 1e-5
                total += -((1 - pt) ** 2) * math.log(pt)
                count += 1
    assert float(focal_loss(probs, target)) == pytest.approx(total / count, rel=1e-9)
    dices = []
    for b in range(2):
        p, t = probs[b, 1].numpy().ravel(), target[b].numpy().ravel()
        dices.append((2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    assert float(dice_loss(probs[:, 1], target)) == pytest.approx(1 - np.mean(dices), rel=1e-9)


def _save(path, state):
    torch.save({CHECKPOINT_KEY: state}, path)
    return path


def test_checkpoint_keys_and_shapes_are_checked(tmp_path):
    good = LinearAdapters(8, 4, 2).state_dict()
    adapters = load_adapters(_save(tmp_path / "ok.pth", good), n_layers=2, dim_in=8)
    assert len(adapters.fc) == 2
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_adapters(tmp_path / "missing.pth")
    torch.save({"state_dict": good}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth: no 'trainable_linearlayer'"):
        load_adapters(tmp_path / "other.pth")
    bad = dict(good)
    bad["fc.1.weight"] = torch.zeros(4, 9)
    with pytest.raises(ValueError, match="fc.1 has shapes"):
        load_adapters(_save(tmp_path / "shape.pth", bad))
    extra = {**good, "proj": torch.zeros(1)}
    with pytest.raises(ValueError, match="are not fc"):
        load_adapters(_save(tmp_path / "keys.pth", extra))
    with pytest.raises(ValueError, match="2 adapters but the feature cache has 4 layers"):
        load_adapters(tmp_path / "ok.pth", n_layers=4)
    with pytest.raises(ValueError, match="adapters take 8-d tokens, the backbone gives 64"):
        load_adapters(tmp_path / "ok.pth", dim_in=64)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pth: not a weights-only torch file"):
        load_adapters(tmp_path / "junk.pth")


@pytest.fixture(scope="module")
def tiny42(tiny_clip):
    return build_backbone(tiny_clip, 42, pretrained=None, seed=0)


def test_training_writes_a_weights_only_checkpoint(tiny42, demo_dataset, tmp_path, caplog):
    rows = training_samples(demo_dataset, "demo", max_images=4)
    assert {r["category"] for r in rows} == {"tiles", "widget"} and len(rows) == 8
    out = tmp_path / "ck" / "adapters.pt"
    cfg = TrainConfig(epochs=2, batch_size=4, mosaic_p=0.5, dim_out=32, seed=3)
    with caplog.at_level("INFO", logger="anorefiner"):
        train_adapters(tiny42, rows, cfg, out, text_cache=str(tmp_path / "text"))
    obj = torch.load(out, map_location="cpu", weights_only=True)
    assert sorted(obj[CHECKPOINT_KEY]) == sorted(f"fc.{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    losses = obj["meta"]["epoch_losses"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert "april_gan epoch 2/2: mean loss" in caplog.text
    assert load_adapters(out, 4, 64).fc[0].weight.shape == (32, 64)
    # Same seed, same adapters: the run is reproducible, whatever the number of decoding threads.
    again_cfg = TrainConfig(epochs=2, batch_size=4, mosaic_p=0.5, dim_out=32, seed=3, workers=1)
    train_adapters(tiny42, rows, again_cfg, tmp_path / "again.pt", text_cache=str(tmp_path / "text"))
    again = torch.load(tmp_path / "again.pt", weights_only=True)[CHECKPOINT_KEY]
    torch.testing.assert_close(again["fc.3.weight"], obj[CHECKPOINT_KEY]["fc.3.weight"])


def test_mosaic_pastes_four_images_with_their_masks(demo_dataset):
    rows = [r for r in training_samples(demo_dataset, "demo") if r["category"] == "tiles"]
    img, mask = mosaic(rows, np.random.default_rng(0))
    assert img.size == (128, 128) and mask.size == (128, 128)
    assert set(np.unique(np.asarray(mask))) <= {0, 255}


def test_missing_auxiliary_dataset_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="auxiliary dataset 'visa': folder .*nowhere does not exist"):
        training_samples(tmp_path / "nowhere", "visa")


def test_backend_end_to_end_on_a_feature_cache(tiny42, demo_dataset, tmp_path):
    index = index_category(demo_dataset, "widget", dataset="demo")
    path = extract_features(index, tiny42, tmp_path / "widget.h5", batch_size=6)
    feats = read_features(path)
    ck = _save(tmp_path / "a.pt", LinearAdapters(64, 32, 4).state_dict())
    backend = get_backend("april_gan", {"checkpoint": str(ck), "class_name": "widget", "device": "cpu",
                                        "text_cache": str(tmp_path / "text")}, backbone=tiny42)
    result = backend.coarse(feats)
    n = len(feats.ids)
    assert result.maps.shape == (n, 3, 3) and result.scores.shape == (n,)
    assert (result.maps >= 0).all() and (result.maps <= 4).all() and ((result.scores > 0) & (result.scores < 1)).all()
    # Pseudo-anomaly scoring (PGT) gives the same maps for the same tokens.
    q = {k: torch.as_tensor(v[:2]) for k, v in feats.layers.items()}
    torch.testing.assert_close(backend.score_queries(q, None, feats, [0, 1], [None, None]),
                               torch.as_tensor(result.maps[:2]))
    with pytest.raises(ValueError, match="no class name"):
        get_backend("april_gan", {"checkpoint": str(ck), "class_name": ""}, backbone=tiny42)
    with pytest.raises(ValueError, match="needs option 'checkpoint'"):
        get_backend("april_gan", {"class_name": "widget"}, backbone=tiny42)
    from anorefiner.config import ConfigError

    with pytest.raises(ConfigError, match="temprature"):
        get_backend("april_gan", {"checkpoint": str(ck), "temprature": 1}, backbone=tiny42)
