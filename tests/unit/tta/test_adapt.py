"""The per-category TTA loop on MuSc over the tiny CLIP: equal to MuSc* without updates, only the
adapted parameters change, deterministic for a seed, pretrained weights restored per category."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anorefiner.cache import Features
from anorefiner.tta import TTAConfig, adapt_category, build_tta_backend
from anorefiner.tta.adapt import Adapter, build_method
from anorefiner.tta.deyo import DeYOConfig
from anorefiner.zsad import get_backend
from anorefiner.zsad.groups import make_groups

N, U = 12, 6


@pytest.fixture
def images():
    return torch.randn(N, 3, 56, 56, generator=torch.Generator().manual_seed(11))


def _run(backbone, images, method, seed=0, **options):
    cfg = TTAConfig(micro_batch=4, **options)
    backend = build_tta_backend("musc", "musc_star", {"group_size": U}, backbone, cfg, seed, torch.device("cpu"))
    groups = make_groups(N, U, seed=seed)
    return adapt_category(backend, method, groups, lambda idx: images[idx], cfg, seed, nominal_batch=U)


def test_without_updates_the_maps_are_musc_star(tiny_vit, images):
    maps, scores, logs = _run(tiny_vit, images, "sar", lr=0.0)
    layers, cls = tiny_vit.forward(images)
    feats = Features(ids=[str(i) for i in range(N)], layers={k: v.numpy() for k, v in layers.items()},
                     cls=cls.numpy())
    ref = get_backend("musc_star", {"group_size": U, "device": "cpu"}, backbone=tiny_vit, seed=0).coarse(feats)
    np.testing.assert_allclose(maps, ref.maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, ref.scores, rtol=1e-5, atol=1e-6)
    assert [g["images"] for g in logs] == [6, 6] and all(0 <= g["kept_fraction"] <= 1 for g in logs)


@pytest.mark.parametrize("method", ["sar", "deyo", "tipi"])
def test_only_the_adapted_parameters_change(tiny_vit, images, method):
    cfg = TTAConfig(micro_batch=3, lr=1.0)
    if method == "deyo":
        cfg.deyo.plpd_threshold = -1.0  # keep every image, so an update surely happens
    backend = build_tta_backend("musc", "musc_star", {"group_size": U}, tiny_vit, cfg, 0, torch.device("cpu"))
    m = build_method(method, cfg)
    adapter = Adapter(backend, m, cfg, nominal_batch=U)
    before = {n: p.detach().clone() for n, p in tiny_vit.model.named_parameters()}
    x = images[:U]
    backend.begin_group(x)
    log = m.step(adapter, x, torch.Generator().manual_seed(0))
    assert log["stepped"], log
    adapted = {id(p) for p in adapter.params}
    changed = {n for n, p in tiny_vit.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "no parameter moved"
    named = dict(tiny_vit.model.named_parameters())
    assert all(id(named[n]) in adapted for n in changed), changed
    assert all("ln_" in n for n in changed)
    adapter.release()
    assert all(torch.equal(p.detach(), before[n]) for n, p in tiny_vit.model.named_parameters())


@pytest.mark.parametrize("method", ["sar", "deyo", "tipi"])
def test_deterministic_for_a_seed_and_weights_restored(tiny_vit, images, method):
    pretrained = {n: p.detach().clone() for n, p in tiny_vit.model.named_parameters()}
    extra = {"deyo": DeYOConfig(plpd_threshold=-1.0)} if method == "deyo" else {}  # updates happen
    a = _run(tiny_vit, images, method, lr=1.0, **extra)
    assert all(g["stepped"] for g in a[2])
    assert all(torch.equal(p.detach(), pretrained[n]) for n, p in tiny_vit.model.named_parameters())
    b = _run(tiny_vit, images, method, lr=1.0, **extra)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    strip = [repr({k: v for k, v in g.items() if k != "seconds"}) for g in a[2]]
    assert strip == [repr({k: v for k, v in g.items() if k != "seconds"}) for g in b[2]]
    if method != "sar":  # the seed draws DeYO's shuffles / TIPI's starts (and the groups)
        c = _run(tiny_vit, images, method, seed=1, lr=1.0, **extra)
        assert not np.array_equal(a[0], c[0])


def test_adaptation_changes_the_maps_and_pre_differs_from_post(tiny_vit, images):
    base, _, _ = _run(tiny_vit, images, "tipi", lr=0.0)
    post, _, logs = _run(tiny_vit, images, "tipi", lr=5.0)
    pre, _, _ = _run(tiny_vit, images, "tipi", lr=5.0, prediction="pre")
    assert all(g["stepped"] for g in logs)
    assert not np.allclose(post, base)
    groups = make_groups(N, U, seed=0)
    # "pre": the first group is scored before any update, so it equals the unadapted maps
    np.testing.assert_allclose(pre[groups[0]], base[groups[0]], rtol=1e-5, atol=1e-6)
    assert not np.allclose(pre[groups[1]], base[groups[1]])


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="prediction"):
        TTAConfig(prediction="later").validate()
    with pytest.raises(ValueError, match="unknown TTA method 'tent'"):
        build_method("tent", TTAConfig())


@pytest.mark.gpu
def test_cuda_bfloat16_run_matches_the_cpu_maps_without_updates(tiny_clip, images):
    from anorefiner.backbones import build_backbone

    cpu = build_backbone(tiny_clip, 56, pretrained=None, seed=0)
    gpu = build_backbone(tiny_clip, 56, pretrained=None, seed=0, device="cuda")
    ref, _, _ = _run(cpu, images, "tipi", lr=0.0)
    cfg = TTAConfig(micro_batch=4, lr=0.0)  # autocast "auto": bfloat16 on CUDA
    backend = build_tta_backend("musc", "musc_star", {"group_size": U}, gpu, cfg, 0, torch.device("cuda"))
    assert backend.autocast_dtype == torch.bfloat16
    maps, scores, logs = adapt_category(backend, "tipi", make_groups(N, U, seed=0), lambda idx: images[idx],
                                        cfg, 0, nominal_batch=U)
    assert np.isfinite(maps).all() and np.isfinite(scores).all() and all(g["stepped"] for g in logs)
    np.testing.assert_allclose(maps, ref, rtol=0.05, atol=0.05)  # bfloat16 tokens
