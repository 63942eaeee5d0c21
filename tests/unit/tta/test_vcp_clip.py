"""VCP-CLIP as a TTA backend (tta.md A.5 P2(a), P4): its units are its two branches' token logits and the
max-pooled map as DeYO's image unit; without updates its predictions are VCP-CLIP's maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anorefiner.cache import Features
from anorefiner.tta import TTAConfig, adapt_category, build_tta_backend
from anorefiner.tta.adapt import Adapter, build_method
from anorefiner.zsad import get_backend
from anorefiner.zsad.groups import make_groups
from anorefiner.zsad.vcp_clip.backend import VcpDims, VcpModel


@pytest.fixture
def options(tiny_vit, tmp_path):
    ck = tmp_path / "vcp.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VcpModel(VcpDims.of_backbone(tiny_vit))
    torch.save(model.state_official(), ck)
    return {"checkpoint": str(ck), "device": "cpu", "sigma": 1.0}


def _backend(tiny_vit, options, cfg):
    return build_tta_backend("vcp_clip", "vcp_clip", options, tiny_vit, cfg, 0, torch.device("cpu"))


def _image_unit_loop(raw, new, alpha):
    """Per image: max over tokens of alpha * mean_l p_raw + (1 - alpha) * mean_l p_new, as (log 1-p, log p)."""
    raw = [np.asarray(r, np.float64) for r in raw]
    new = [np.asarray(n, np.float64) for n in new]
    b, _, h, w = raw[0].shape
    out = np.zeros((b, 2))
    for i in range(b):
        best = -np.inf
        for y in range(h):
            for x in range(w):
                pr = np.mean([1 / (1 + np.exp(r[i, 0, y, x] - r[i, 1, y, x])) for r in raw])
                pn = np.mean([1 / (1 + np.exp(n[i, 0, y, x] - n[i, 1, y, x])) for n in new])
                best = max(best, alpha * pr + (1 - alpha) * pn)
        p = min(max(best, 1e-6), 1 - 1e-6)
        out[i] = (np.log(1 - p), np.log(p))
    return out


def test_units_are_the_two_branches_logits(tiny_vit, options, group_images):
    backend = _backend(tiny_vit, options, TTAConfig())
    zsad = backend.zsad
    u = backend.units(group_images, torch.arange(6))
    n_layers = len(tiny_vit.layers)
    assert u.patch.shape == (6, 2 * n_layers * 16, 2) and u.image.shape == (6, 2)
    layers, cls = tiny_vit.forward(group_images)
    g = tiny_vit.image_embedding(cls, normalize=False)
    with torch.no_grad():
        text = zsad.model.text(tiny_vit, zsad.tokens, g)
        raw, new = zsad.model.layer_logits([layers[k].reshape(6, 16, -1) for k in tiny_vit.layers], text, (4, 4))
    for j, lg in enumerate(raw + new):
        ref = lg.flatten(2).transpose(1, 2)
        torch.testing.assert_close(u.patch[:, j * 16:(j + 1) * 16].detach(), ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(u.image.detach().numpy(), _image_unit_loop(raw, new, zsad.config.alpha),
                               rtol=1e-5, atol=1e-5)


def test_without_updates_the_maps_are_vcp_clips(tiny_vit, options):
    x = torch.randn(8, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    cfg = TTAConfig(micro_batch=3, lr=0.0, group_size=4)
    backend = _backend(tiny_vit, options, cfg)
    maps, scores, logs = adapt_category(backend, "deyo", make_groups(8, 4, seed=0), lambda i: x[i], cfg, 0)
    layers, cls = tiny_vit.forward(x)
    feats = Features(ids=[str(i) for i in range(8)], layers={k: v.numpy() for k, v in layers.items()},
                     cls=cls.numpy())
    ref = get_backend("vcp_clip", {**options, "class_minmax": False}, backbone=tiny_vit).coarse(feats)
    np.testing.assert_allclose(maps, ref.maps, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores, ref.scores, rtol=1e-5, atol=1e-6)
    assert all("plpd_mean" in g for g in logs)


def test_an_update_moves_only_vision_layernorms(tiny_vit, options, group_images):
    cfg = TTAConfig(micro_batch=3, lr=1.0)
    backend = _backend(tiny_vit, options, cfg)
    adapter = Adapter(backend, build_method("tipi", cfg), cfg, nominal_batch=6)
    assert "ln_post.weight" in adapter.names  # ln_post feeds Pre-VCP, so TIPI adapts it
    before = {n: p.detach().clone() for n, p in tiny_vit.model.named_parameters()}
    vcp_before = {n: p.detach().clone() for n, p in backend.zsad.model.named_parameters()}
    log = adapter.method.step(adapter, group_images, torch.Generator().manual_seed(0))
    assert log["stepped"]
    changed = {n for n, p in tiny_vit.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(n.startswith("visual.") and "ln_" in n for n in changed)
    assert all(torch.equal(p, vcp_before[n]) for n, p in backend.zsad.model.named_parameters())
    adapter.release()
