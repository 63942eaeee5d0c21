"""RegAD: transforms, feature concatenation, the Gaussian and the Mahalanobis distance against float64 loops; the
leave-one-category-out training and the backend end to end with a random ResNet-18 at 64 px."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from anorefiner.zsad.regad.backend import embedding_concat, gaussian, mahalanobis
from anorefiner.zsad.regad.model import STN_MODES, StnResNet, cos_loss, inverse, theta_of
from anorefiner.zsad.regad.train import batches, cosine_lr

from ..reference import affine_warp_loop

MATRICES = {  # stn.py l.98-147, written out per mode for parameters p
    "affine": lambda p: [[p[0], p[1], p[2]], [p[3], p[4], p[5]]],
    "translation": lambda p: [[1, 0, p[0]], [0, 1, p[1]]],
    "rotation": lambda p: [[math.cos(p[0]), -math.sin(p[0]), 0], [math.sin(p[0]), math.cos(p[0]), 0]],
    "scale": lambda p: [[p[0], 0, 0], [0, p[1], 0]],
    "shear": lambda p: [[1, p[0], 0], [p[1], 1, 0]],
    "rotation_scale": lambda p: [[math.cos(p[0]) * p[1], -math.sin(p[0]), 0],
                                 [math.sin(p[0]), math.cos(p[0]) * p[2], 0]],
    "translation_scale": lambda p: [[p[2], 0, p[0]], [0, p[3], p[1]]],
    "rotation_translation": lambda p: [[math.cos(p[0]), -math.sin(p[0]), p[1]],
                                       [math.sin(p[0]), math.cos(p[0]), p[2]]],
    "rotation_translation_scale": lambda p: [[math.cos(p[0]) * p[3], -math.sin(p[0]), p[1]],
                                             [math.sin(p[0]), math.cos(p[0]) * p[4], p[2]]],
}


@pytest.mark.parametrize("mode", sorted(STN_MODES))
def test_transforms_match_the_official_matrices(mode):
    p = torch.rand(3, len(STN_MODES[mode]), generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.2
    theta = theta_of(mode, p)
    for b in range(3):
        np.testing.assert_allclose(theta[b].numpy(), np.array(MATRICES[mode](p[b].tolist())), rtol=1e-12)
        full = np.vstack([theta[b].numpy(), [0, 0, 1]])
        np.testing.assert_allclose(inverse(theta)[b].numpy(), np.linalg.inv(full)[:2], rtol=1e-10)
    # the identity the STNs start from (their last layer's bias)
    ident = theta_of(mode, torch.tensor([STN_MODES[mode]], dtype=torch.float64))
    np.testing.assert_allclose(ident[0].numpy(), [[1, 0, 0], [0, 1, 0]], atol=1e-12)


def test_embedding_concat_matches_the_official_unfold_fold():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 2, 2, generator=g,
                                                                                  dtype=torch.float64)
    z = embedding_concat(x, y)
    # utils/funcs.py embedding_concat: unfold x in s x s blocks, append y's cell to each block element, fold back
    s = 4
    xu = torch.nn.functional.unfold(x, kernel_size=s, stride=s).view(2, 3, -1, 2, 2)
    zz = torch.zeros(2, 7, xu.size(2), 2, 2, dtype=torch.float64)
    for i in range(xu.size(2)):
        zz[:, :, i] = torch.cat((xu[:, :, i], y), 1)
    want = torch.nn.functional.fold(zz.view(2, -1, 4), kernel_size=s, output_size=(8, 8), stride=s)
    torch.testing.assert_close(z, want)
    with pytest.raises(ValueError, match="not multiples"):
        embedding_concat(x, torch.randn(2, 4, 3, 3))


def test_gaussian_and_mahalanobis_match_loops():
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(9, 3, 5, generator=g, dtype=torch.float64)
    test = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    mean, prec = gaussian(emb, 0.01, chunk=2)
    dist = mahalanobis(test, mean, prec, chunk=3).numpy()
    for p in range(5):
        cov = np.cov(emb[:, :, p].numpy().T) + 0.01 * np.eye(3)  # torch.cov: unbiased, as np.cov
        inv = np.linalg.inv(cov)
        mu = emb[:, :, p].numpy().mean(0)
        for b in range(2):
            d = test[b, :, p].numpy() - mu
            assert dist[b, p] == pytest.approx(math.sqrt(d @ inv @ d), rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 support samples"):
        gaussian(emb[:1], 0.01)


def test_registered_features_match_loops():
    """stn.py l.245-274: each stage warped by its STN; the kept features warped back by the inverse transforms of
    that stage and every earlier one (loops: the reflection-padded bilinear sampler, numpy's matrix inverse)."""
    from anorefiner.backbones import build_backbone

    bb = build_backbone("resnet18", 64, layers=["layer1"], pretrained=None, seed=0)
    net = StnResNet(bb.model, 64).double().eval()
    with torch.no_grad():
        for i, stn in enumerate((net.stn1, net.stn2, net.stn3)):  # away from the identity start
            stn.fc[2].bias.copy_(torch.tensor([0.1 * (i + 1), 0.9, 1.1]))
            stn.fc[2].weight.normal_(0, 1e-4)
        x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        out, back = net(x, registered=True)
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        warped, thetas = [], []
        for layer, stn in ((net.layer1, net.stn1), (net.layer2, net.stn2), (net.layer3, net.stn3)):
            h = layer(h)
            theta = theta_of("rotation_scale", stn.fc(stn.conv(h).flatten(1)))[0].numpy()
            h = torch.from_numpy(affine_warp_loop(h[0].numpy(), theta))[None]
            warped.append(h[0].numpy())
            thetas.append(theta)
    torch.testing.assert_close(out, h, rtol=1e-9, atol=1e-9)
    inv = [np.linalg.inv(np.vstack([t, [0, 0, 1]]))[:2] for t in thetas]
    for i, f in enumerate(warped):
        for t in reversed(inv[: i + 1]):
            f = affine_warp_loop(f, t)
        np.testing.assert_allclose(back[i][0].numpy(), f, rtol=1e-9, atol=1e-9)


def test_siamese_loss_and_schedule_match_loops():
    g = torch.Generator().manual_seed(3)
    p, z = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, 3, generator=g,
                                                                                  dtype=torch.float64)
    cos = [float(p[b, :, i, j] @ z[b, :, i, j] / (p[b, :, i, j].norm() * z[b, :, i, j].norm()))
           for b in range(2) for i in range(3) for j in range(3)]
    assert float(cos_loss(p, z)) == pytest.approx(-np.mean(cos), rel=1e-12)
    z.requires_grad_(True)
    cos_loss(p.requires_grad_(True), z).backward()
    assert z.grad is None  # stop-gradient on the target
    assert [cosine_lr(1e-4, e, 4) for e in (1, 2, 4)] == pytest.approx(
        [1e-4 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in (1, 2, 4)])
    assert cosine_lr(1e-4, 4, 4) == pytest.approx(0.0, abs=1e-20)


def test_training_batches_follow_shuffle_dataset():
    rng = np.random.default_rng(0)
    plan = batches({"a": 7, "b": 3}, 4, 3, rng)
    assert sorted(len(q) for _, q, _ in plan) == [3, 3, 4]  # a: 4 + 3, b: 3
    for cat in ("a", "b"):
        queries = [i for c, q, _ in plan if c == cat for i in q]
        assert sorted(queries) == list(range({"a": 7, "b": 3}[cat]))  # each image is a query once per epoch
    for cat, q, s in plan:
        for i, sup in zip(q, s):
            assert len(sup) == 3 and i not in sup and all(0 <= j < {"a": 7, "b": 3}[cat] for j in sup)
    with pytest.raises(ValueError, match="supports need 2"):
        batches({"c": 1}, 4, 2, rng)


def test_training_and_backend_end_to_end(demo_dataset, tmp_path):
    from anorefiner.backbones import build_backbone
    from anorefiner.cache import extract_features, read_features
    from anorefiner.data.index import index_category, load_image
    from anorefiner.zsad import get_backend
    from anorefiner.zsad.regad.model import load_networks
    from anorefiner.zsad.regad.train import TrainConfig, check_checkpoint, train_fewshot
    from anorefiner.zsad.shots import TrainGood

    bb = build_backbone("resnet18", 64, layers=["layer1"], pretrained=None, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=3, image_size=64)
    ck = train_fewshot(bb, demo_dataset, "demo", "tiles", cfg, tmp_path / "r.pt", k_shot=2)
    check_checkpoint(ck, bb)
    obj = torch.load(ck, map_location="cpu", weights_only=True)
    assert set(obj) == {"STN", "ENC", "PRED", "meta"} and "stn1.fc.2.bias" in obj["STN"]
    assert json.loads(obj["meta"]["trained_on"]) == ["widget"]  # leave-one-category-out
    nets, _, _ = load_networks(ck, bb)
    assert nets["STN"].stn3.fc[0].in_features == 16 * 1 * 1  # 64 px: stage 3 is 4 x 4, after two pools 1 x 1
    index = index_category(demo_dataset, "tiles", dataset="demo")
    feats = read_features(extract_features(index, bb, tmp_path / "f.h5", batch_size=6))
    paths = list(index[index["split"] == "test"]["image_path"])
    res = {}
    for seed in (0, 1):
        be = get_backend("regad", {"k_shot": 2, "checkpoint": str(ck), "device": "cpu", "position_chunk": 100},
                         backbone=bb, seed=seed)
        be.images = lambda idx: [load_image(paths[i]) for i in idx]
        be.train_images = TrainGood(demo_dataset, "demo", "tiles")
        res[seed] = be.coarse(feats)
        assert be.last_info["shots"] == TrainGood(demo_dataset, "demo", "tiles").draw(2, seed)
    r = res[0]
    assert r.maps.shape == (12, 16, 16) and r.scores.max() == pytest.approx(1.0)  # category min-max, max = score
    assert r.maps.min() >= 0 and (r.scores >= r.maps.reshape(12, -1).max(1) - 1e-6).all()
    assert not np.allclose(res[0].maps, res[1].maps)  # other shots, other Gaussian
    with pytest.raises(ValueError, match="only one"):
        train_fewshot(bb, demo_dataset, "demo", "tiles", cfg, tmp_path / "x.pt", k_shot=2, categories=["tiles"])
    with pytest.raises(ValueError, match="needs the resnet18 backbone"):
        load_networks(ck, type("B", (), {"name": "resnet50"})())
