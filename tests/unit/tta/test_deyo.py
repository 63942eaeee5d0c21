"""DeYO (tta.md A.2): the object-destroying shuffle, PLPD, selection and weights against slow readings."""

from __future__ import annotations

import math

import pytest
import torch

from anorefiner.tta.adapt import Adapter, TTAConfig
from anorefiner.tta.common import LN2, micro_batches
from anorefiner.tta.deyo import DeYO, DeYOConfig, destroy, plpd, weighted_terms


def _entropy64(logits):
    p = torch.softmax(logits.double(), -1)
    return -(p * p.log()).sum(-1)


def test_patch_shuffle_permutes_the_16_tiles_of_each_image():
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = destroy(x, torch.Generator().manual_seed(5), patch_len=4)
    assert y.shape == x.shape
    for b in range(3):
        tiles_in = [x[b, :, i * 8:(i + 1) * 8, j * 8:(j + 1) * 8] for i in range(4) for j in range(4)]
        used = []
        for i in range(4):
            for j in range(4):
                out = y[b, :, i * 8:(i + 1) * 8, j * 8:(j + 1) * 8]
                match = [k for k, t in enumerate(tiles_in) if torch.equal(t, out)]
                assert len(match) == 1
                used.append(match[0])
        assert sorted(used) == list(range(16)) and used != list(range(16))
    again = destroy(x, torch.Generator().manual_seed(5), patch_len=4)
    assert torch.equal(y, again)  # the seed decides the permutation
    assert not torch.equal(y, destroy(x, torch.Generator().manual_seed(6), patch_len=4))


def test_sizes_off_the_grid_are_resized_and_back_and_other_augmentations():
    x = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    assert destroy(x, torch.Generator().manual_seed(0)).shape == x.shape  # 30 -> 28 -> 30
    occ = destroy(x, torch.Generator(), aug_type="occ")
    mean = x.mean(dim=(2, 3))
    torch.testing.assert_close(occ[:, :, 7:22, 7:22], mean[:, :, None, None].expand(2, 3, 15, 15))
    assert torch.equal(occ[:, :, :7], x[:, :, :7])
    pix = destroy(x, torch.Generator().manual_seed(0), aug_type="pixel")
    torch.testing.assert_close(pix.flatten(2).sort(-1).values, x.flatten(2).sort(-1).values)
    with pytest.raises(ValueError, match="aug_type"):
        destroy(x, torch.Generator(), aug_type="blur")


def test_plpd_selection_and_weights_match_loops():
    g = torch.Generator().manual_seed(2)
    img, img_d = torch.randn(5, 2, generator=g) * 2, torch.randn(5, 2, generator=g) * 2
    patch = torch.randn(5, 6, 2, generator=g) * 3
    cfg = DeYOConfig(plpd_threshold=0.05)
    pl = plpd(img, img_d)
    h, mask, weight, wh = weighted_terms(patch, pl, cfg)
    for b in range(5):
        p = torch.softmax(img[b].double(), -1).tolist()
        q = torch.softmax(img_d[b].double(), -1).tolist()
        y = 0 if p[0] >= p[1] else 1
        ref_pl = p[y] - q[y]
        assert pl[b].item() == pytest.approx(ref_pl, abs=1e-6)
        for u in range(6):
            a, c = patch[b, u].double().tolist()
            pa = 1 / (1 + math.exp(c - a))
            ent = -(pa * math.log(pa) + (1 - pa) * math.log(1 - pa))
            keep = ent < 0.5 * math.log(2) and ref_pl > 0.05
            w = math.exp(0.4 * math.log(2) - ent) + math.exp(ref_pl)
            assert bool(mask[b, u]) == keep
            assert weight[b, u].item() == pytest.approx(w, rel=1e-5)
            assert wh[b, u].item() == pytest.approx(w * ent, abs=1e-6)
    assert 0 < int(mask.sum()) < mask.numel()


def test_step_matches_the_full_batch_reading(head_backend, group_images):
    x, n = group_images, len(group_images)
    mb = 4
    # the shuffled copies the step will draw (one destroy call per micro-batch, same generator)
    gen = torch.Generator().manual_seed(9)
    x_d = torch.cat([destroy(x[p], gen) for p in micro_batches(n, mb)])
    pos = torch.arange(n)
    with torch.no_grad():
        ref_pl = plpd(head_backend.units(x, pos).image, head_backend.units(x_d, pos).image)
    s = ref_pl.sort().values  # a threshold between two images that keeps some and drops others (one
    thr = float(s[len(s) // 2 - 1 : len(s) // 2 + 1].mean())  # exactly on an image: float noise decides)
    cfg = TTAConfig(micro_batch=mb, lr=0.5, deyo=DeYOConfig(plpd_threshold=thr))
    method = DeYO(cfg.deyo)
    adapter = Adapter(head_backend, method, cfg, nominal_batch=n)
    params = adapter.params
    start = [p.detach().clone() for p in params]
    # full-batch reading of tta.md A.2 in float64
    u = head_backend.units(x, pos)
    terms = []
    for logits, pl_shape in ((u.patch, (-1, 1)), (u.image, (-1,))):
        h = _entropy64(logits)
        pl = ref_pl.double().reshape(pl_shape)
        keep = (h < 0.5 * LN2) & (pl > thr)
        alpha = torch.exp(0.4 * LN2 - h.detach()) + torch.exp(pl)
        if keep.any():
            terms.append((alpha * h)[keep].mean())
    loss = sum(terms)
    grads = torch.autograd.grad(loss, params)
    log = method.step(adapter, x, torch.Generator().manual_seed(9))
    assert log["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert 0 < log["kept"] < log["units"]
    for p, s, g in zip(params, start, grads):
        torch.testing.assert_close(p.detach(), s - 0.5 * g.float(), rtol=1e-4, atol=1e-6)


def test_no_selected_unit_means_no_update(head_backend, group_images):
    cfg = TTAConfig(micro_batch=3, lr=0.5, deyo=DeYOConfig(plpd_threshold=2.0))  # PLPD <= 1 always
    method = DeYO(cfg.deyo)
    adapter = Adapter(head_backend, method, cfg, nominal_batch=6)
    log = method.step(adapter, group_images, torch.Generator().manual_seed(0))
    assert log["kept"] == 0 and not log["stepped"] and math.isnan(log["loss"])
    assert all(torch.equal(p.detach(), s) for p, s in zip(adapter.params, adapter.pretrained))
