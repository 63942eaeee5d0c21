"""APRIL-GAN as a TTA backend (tta.md A.5 P2(a)): its units are its own token and image logits, its
predictions are the APRIL-GAN maps; ln_post is adapted by TIPI only (it feeds the image unit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anorefiner.cache import Features
from anorefiner.tta import TTAConfig, adapt_category, build_tta_backend
from anorefiner.tta.adapt import Adapter, build_method
from anorefiner.zsad import get_backend
from anorefiner.zsad.april_gan.backend import CHECKPOINT_KEY, LinearAdapters, layer_logits
from anorefiner.zsad.groups import make_groups


@pytest.fixture
def options(tmp_path):
    ck = tmp_path / "adapters.pt"
    torch.manual_seed(0)
    torch.save({CHECKPOINT_KEY: LinearAdapters(64, 32, 4).state_dict()}, ck)
    return {"checkpoint": str(ck), "class_name": "widget", "device": "cpu", "text_cache": str(tmp_path / "text")}


def _backend(tiny_vit, options, cfg):
    return build_tta_backend("april_gan", "april_gan", options, tiny_vit, cfg, 0, torch.device("cpu"))


def test_units_are_the_detectors_logits(tiny_vit, options, group_images):
    backend = _backend(tiny_vit, options, TTAConfig())
    zsad = backend.zsad
    u = backend.units(group_images, torch.arange(6))
    assert u.patch.shape == (6, 4 * 16, 2) and u.image.shape == (6, 2)
    layers, cls = tiny_vit.forward(group_images)
    for li, name in enumerate(tiny_vit.layers):
        p = zsad.adapters([layers[k].reshape(6, 16, 64) for k in tiny_vit.layers])[li]
        ref = layer_logits(p, zsad.text, (4, 4), 100.0).flatten(2).transpose(1, 2)
        torch.testing.assert_close(u.patch[:, li * 16:(li + 1) * 16].detach(), ref, rtol=1e-5, atol=1e-4)
    g = tiny_vit.image_embedding(cls, normalize=True)
    ref_img = 100.0 * g @ torch.nn.functional.normalize(zsad.text.float(), dim=-1).T
    torch.testing.assert_close(u.image.detach(), ref_img, rtol=1e-5, atol=1e-4)


def test_without_updates_the_maps_are_april_gans(tiny_vit, options):
    x = torch.randn(8, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    cfg = TTAConfig(micro_batch=3, lr=0.0, group_size=4)
    backend = _backend(tiny_vit, options, cfg)
    maps, scores, logs = adapt_category(backend, "deyo", make_groups(8, 4, seed=0), lambda i: x[i], cfg, 0)
    layers, cls = tiny_vit.forward(x)
    feats = Features(ids=[str(i) for i in range(8)], layers={k: v.numpy() for k, v in layers.items()},
                     cls=cls.numpy())
    ref = get_backend("april_gan", options, backbone=tiny_vit).coarse(feats)
    np.testing.assert_allclose(maps, ref.maps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores, ref.scores, rtol=1e-5, atol=1e-6)
    assert all("plpd_mean" in g for g in logs)


@pytest.mark.parametrize("method,ln_post", [("tipi", True), ("sar", False)])
def test_ln_post_adapts_with_tipi_only(tiny_vit, options, group_images, method, ln_post):
    cfg = TTAConfig(micro_batch=3, lr=1.0)
    backend = _backend(tiny_vit, options, cfg)
    adapter = Adapter(backend, build_method(method, cfg), cfg, nominal_batch=6)
    assert ("ln_post.weight" in adapter.names) == ln_post
    before = {n: p.detach().clone() for n, p in tiny_vit.model.named_parameters()}
    log = adapter.method.step(adapter, group_images, torch.Generator().manual_seed(0))
    assert log["stepped"]
    changed = {n for n, p in tiny_vit.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(n.startswith("visual.") and "ln_" in n for n in changed)
    assert ("visual.ln_post.weight" in changed) == ln_post
    adapter.release()
