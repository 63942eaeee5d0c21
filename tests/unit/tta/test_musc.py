"""MuSc as a TTA backend (tta.md A.5 P2(b)): differentiable mutual scoring equals MuSc's MSM, its
nearest-patch selection equals a brute-force float64 loop, and gradients reach only the LN affines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anorefiner.tta.adapt import Adapter, TTAConfig
from anorefiner.tta.musc import MAD_TO_SIGMA, MuscTTA, MuscTTAConfig, nearest_selection, selected_scores, vit_forward
from anorefiner.tta.sar import SAR
from anorefiner.zsad.musc.backend import MuscConfig, effective_k, lnamd, msm


def test_forward_with_gradient_equals_the_backbone_forward(tiny_vit, group_images):
    layers, cls = tiny_vit.forward(group_images)
    mine, mine_cls = vit_forward(tiny_vit, group_images, tiny_vit.layers, need_cls=True)
    for k in layers:
        torch.testing.assert_close(mine[k], layers[k], rtol=0, atol=0)
    torch.testing.assert_close(mine_cls, cls, rtol=0, atol=0)
    early, none = vit_forward(tiny_vit, group_images, ["2"])
    assert none is None and torch.equal(early["2"], layers["2"])


def test_nearest_selection_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    q, ref = torch.randn(2, 5, 3, generator=g), torch.randn(6, 4, 3, generator=g)
    exclude, k = torch.tensor([1, 4]), 2
    images, patches = nearest_selection(q, ref, exclude, k)
    scores = selected_scores(q, ref, images, patches)
    for b in range(2):
        for i in range(5):
            per_image = []
            for j in range(6):
                if j == int(exclude[b]):
                    continue
                d = [float(((q[b, i].double() - ref[j, p].double()) ** 2).sum().sqrt()) for p in range(4)]
                per_image.append((min(d), j, int(np.argmin(d))))
            best = sorted(per_image)[:k]
            assert sorted(images[b, i].tolist()) == sorted(j for _, j, _ in best)
            assert {(j, p) for _, j, p in best} == set(zip(images[b, i].tolist(), patches[b, i].tolist()))
            assert scores[b, i].item() == pytest.approx(np.mean([d for d, _, _ in best]), rel=1e-5)


def test_units_are_calibrated_msm_scores(tiny_vit, group_images):
    backend = MuscTTA(tiny_vit, MuscConfig(), MuscTTAConfig(calib_k=3.0))
    backend.begin_group(group_images)
    g = len(group_images)
    u = backend.units(group_images, torch.arange(g))
    n_layers, n_patches = len(backend.layers), 16
    assert u.patch.shape == (g, n_layers * n_patches, 2) and u.image.shape == (g, 2)
    assert torch.all(u.patch[..., 0] == 0)
    z = u.patch[..., 1].detach().reshape(g, n_layers, n_patches)
    layers, _ = tiny_vit.forward(group_images)
    for li, name in enumerate(backend.layers):
        s_ref = msm(lnamd(layers[name], 1).reshape(g, n_patches, -1), 0.3)
        flat = s_ref.flatten().double().numpy()
        med = np.median(flat)
        scale = MAD_TO_SIGMA * np.median(np.abs(flat - med))
        assert float(backend.scale[li]) == pytest.approx(scale, rel=1e-4)
        assert float(backend.tau[li]) == pytest.approx(med + 3.0 * scale, rel=1e-4)
        torch.testing.assert_close(z[:, li] * backend.scale[li] + backend.tau[li], s_ref, rtol=1e-4, atol=1e-5)
    # image unit: the max of the layer-mean z, standardised again over the group's images
    m = z.mean(1).amax(-1).double().numpy()
    med = np.median(m)
    sc = MAD_TO_SIGMA * np.median(np.abs(m - med))
    np.testing.assert_allclose(u.image[:, 1].detach().double().numpy(), (m - med - 3.0 * sc) / sc, rtol=1e-4, atol=1e-4)
    patch_only = MuscTTA(tiny_vit, MuscConfig(), MuscTTAConfig(image_calibration="patch"))
    patch_only.begin_group(group_images)
    torch.testing.assert_close(patch_only.units(group_images, torch.arange(g)).image[:, 1].detach(),
                               torch.as_tensor(m, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    assert effective_k(g - 1, 0.3) == 1  # small group: the documented k >= 1 fallback


def test_gradients_reach_only_the_adapted_layernorms(tiny_vit, group_images):
    backend = MuscTTA(tiny_vit, MuscConfig(), MuscTTAConfig(query_fraction=0.5))
    cfg = TTAConfig()
    adapter = Adapter(backend, SAR(cfg.sar), cfg, nominal_batch=6)
    backend.begin_group(group_images)
    assert backend.query_idx is not None and len(backend.query_idx) == 8
    u = backend.units(group_images[:2], torch.tensor([0, 1]))
    assert u.patch.shape == (2, 4 * 8, 2)
    u.patch[..., 1].sum().backward()
    adapted = {id(p) for p in adapter.params}
    for name, p in tiny_vit.model.named_parameters():
        if id(p) in adapted:
            assert p.grad is not None, name
        else:
            assert p.grad is None and not p.requires_grad, name
    assert any(float(p.grad.abs().sum()) > 0 for p in adapter.params)
    # SAR's default skips the top quarter: block 4 of 4 and ln_post stay frozen
    assert not tiny_vit.visual.transformer.resblocks[3].ln_1.weight.requires_grad
    assert not tiny_vit.visual.ln_post.weight.requires_grad
    adapter.release()
    assert not any(p.requires_grad for p in tiny_vit.model.parameters())


def test_bad_options_are_named(tiny_vit):
    with pytest.raises(ValueError, match="query_fraction"):
        MuscTTA(tiny_vit, MuscConfig(), MuscTTAConfig(query_fraction=0.0))
    with pytest.raises(ValueError, match="image_calibration"):
        MuscTTA(tiny_vit, MuscConfig(), MuscTTAConfig(image_calibration="max"))
    with pytest.raises(ValueError, match="layers"):
        MuscTTA(tiny_vit, MuscConfig(layers=("7",)))
    with pytest.raises(ValueError, match="at least 2 images"):
        MuscTTA(tiny_vit).begin_group(torch.zeros(1, 3, 56, 56))
