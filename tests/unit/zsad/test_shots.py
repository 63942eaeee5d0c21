"""The few-shot support sets: seeded train/good draws and the official augmentations against float64 loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anorefiner.zsad.shots import (REGAD_ANGLES, TrainGood, affine_warp, augment_mvfa, augment_regad, grey, rotation,
                                   translation)

from .reference import affine_warp_loop


def test_draws_are_seeded_without_replacement_and_shared_with_winclip(demo_dataset):
    from anorefiner.zsad.winclip.backend import train_good_source

    tg = TrainGood(demo_dataset, "demo", "tiles")
    assert len(tg.ids) == 6 and all(i.startswith("train/good/") for i in tg.ids)
    a, b = tg.draw(3, 0), tg.draw(3, 0)
    assert a == b and len(set(a)) == 3 and a == sorted(a, key=tg.ids.index)
    assert {tuple(tg.draw(3, s)) for s in range(8)} != {tuple(a)}  # other seeds, other shots
    # the generator WinCLIP always used: numpy default_rng([seed, 77]), k indices without replacement
    expected = [tg.ids[i] for i in sorted(np.random.default_rng([5, 77]).choice(6, size=2, replace=False))]
    assert tg.draw(2, 5) == expected
    np.testing.assert_array_equal(np.stack(train_good_source(demo_dataset, "demo", "tiles")(2, 5)),
                                  np.stack(tg.load(expected)))
    with pytest.raises(ValueError, match="k_shot=7 but 'tiles' has 6 train/good images"):
        tg.draw(7, 0)
    with pytest.raises(ValueError, match="are not train/good images"):
        tg.load(["test/good/000"])


@pytest.mark.parametrize("theta", [rotation(math.pi / 8), rotation(-3 * math.pi / 16), translation(0.2, -0.1),
                                   translation(-0.2, 0.2), rotation(math.pi / 4)])
def test_affine_warp_matches_a_reflection_padded_bilinear_loop(theta):
    img = torch.rand(2, 3, 6, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fast = affine_warp(img, theta)
    for b in range(2):
        np.testing.assert_allclose(fast[b].numpy(), affine_warp_loop(img[b].numpy(), theta.numpy()), atol=1e-12)


def test_augmentations_are_the_official_views():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mv = augment_mvfa(x)
    assert mv.shape == (22, 3, 8, 8)
    torch.testing.assert_close(mv[:2], x)
    torch.testing.assert_close(mv[2:4], affine_warp(x, rotation(-math.pi / 8)))
    torch.testing.assert_close(mv[10:12], affine_warp(x, translation(0.1, 0.1)))
    torch.testing.assert_close(mv[18:20], x.flip(-1))
    torch.testing.assert_close(mv[20:22], x.flip(-2))
    rg = augment_regad(x)
    assert rg.shape == (44, 3, 8, 8)
    assert sorted(REGAD_ANGLES) == list(REGAD_ANGLES) and len(REGAD_ANGLES) == 8
    torch.testing.assert_close(rg[2:4], affine_warp(x, rotation(-math.pi / 4)))
    torch.testing.assert_close(rg[18:20], affine_warp(x, translation(0.2, 0.2)))
    torch.testing.assert_close(rg[34:36], x.flip(-1))
    torch.testing.assert_close(rg[36:38], grey(x))
    # kornia's rotate by +90 degrees (counter-clockwise) of a square image: output (i, j) reads input (j, W-1-i)
    r90 = rg[38]
    for i in range(8):
        for j in range(8):
            assert float(r90[0, i, j]) == float(x[0, 0, j, 7 - i])
    torch.testing.assert_close(rg[42:44], torch.rot90(x, 3, dims=(-2, -1)))
    g = grey(x)
    np.testing.assert_allclose(g[0, 1].numpy(), 0.299 * x[0, 0].numpy() + 0.587 * x[0, 1].numpy()
                               + 0.114 * x[0, 2].numpy(), rtol=1e-12)
