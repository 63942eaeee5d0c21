"""Shared TTA pieces: 2-class entropy/KL against float64 loops, LN-affine selection by block index,
and group-level gradient accumulation equal to the gradient of the group's means."""

from __future__ import annotations

import math

import pytest
import torch

from anorefiner.tta.common import (
    GroupGrad,
    default_adapt_blocks,
    entropy,
    kl,
    micro_batches,
    select_norm_params,
    torch_generator,
)


def _softmax64(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def test_entropy_and_kl_match_float64_loops():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 7, 2, generator=g) * 4
    b = torch.randn(3, 7, 2, generator=g) * 4
    h, d = entropy(a), kl(a, b)
    for i in range(3):
        for j in range(7):
            p = _softmax64(a[i, j].double().tolist())
            q = _softmax64(b[i, j].double().tolist())
            # float32 results: relative 1e-6 (a KL of 5 nats carries ~5e-7 rounding)
            assert h[i, j].item() == pytest.approx(-sum(v * math.log(v) for v in p), rel=1e-6, abs=1e-6)
            assert d[i, j].item() == pytest.approx(sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q)),
                                                   rel=1e-6, abs=1e-6)
    assert float(entropy(torch.zeros(2))) == pytest.approx(math.log(2))


def test_norm_selection_is_by_block_index(tiny_vit):
    visual = tiny_vit.visual
    assert default_adapt_blocks(24) == 18 and default_adapt_blocks(12) == 9 and default_adapt_blocks(4) == 3
    named = select_norm_params(visual, 3, ln_pre=True, ln_post=False)
    names = [n for n, _ in named]
    assert names[:2] == ["ln_pre.weight", "ln_pre.bias"]
    assert "transformer.resblocks.2.ln_2.bias" in names
    assert not any("resblocks.3" in n or "ln_post" in n for n in names)
    assert len(names) == 2 + 3 * 2 * 2
    assert sum(p.numel() for _, p in named) == (1 + 3 * 2) * 2 * 64
    # every parameter is the module's own tensor (updates act on the model)
    assert named[0][1] is visual.ln_pre.weight
    all_names = [n for n, _ in select_norm_params(visual, 4, ln_pre=True, ln_post=True)]
    assert all_names[-2:] == ["ln_post.weight", "ln_post.bias"] and len(all_names) == 2 + 16 + 2
    with pytest.raises(ValueError, match="adapt_blocks=5"):
        select_norm_params(visual, 5, True, False)


def test_group_grad_equals_gradient_of_the_means_over_micro_batches():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 2, generator=g, requires_grad=True)
    x = torch.randn(10, 5, 4, generator=g)
    xi = torch.randn(10, 4, generator=g)
    thr = 0.5
    # reference: one full batch, mean entropy of the kept patch units + mean of the kept image units
    hp, hi = entropy(x @ w), entropy(xi @ w)
    mp, mi = hp < thr, hi < thr
    ref = hp[mp].mean() + hi[mi].mean()
    (gref,) = torch.autograd.grad(ref, w)
    acc = GroupGrad([w])
    for pos in micro_batches(10, 3):
        a, b = entropy(x[pos] @ w), entropy(xi[pos] @ w)
        acc.add({"patch": ((a * (a < thr)).sum(), int((a < thr).sum())),
                 "image": ((b * (b < thr)).sum(), int((b < thr).sum()))})
    acc.write()
    torch.testing.assert_close(w.grad, gref, rtol=1e-5, atol=1e-7)
    assert acc.loss() == pytest.approx(ref.item(), rel=1e-5)
    assert acc.counts == {"patch": int(mp.sum()), "image": int(mi.sum())}


def test_group_grad_of_an_empty_selection_is_empty():
    w = torch.ones(2, requires_grad=True)
    acc = GroupGrad([w])
    acc.add({"patch": ((w * 0).sum(), 0)})
    assert acc.empty and math.isnan(acc.loss())


def test_generators_are_seeded_streams():
    a = torch.rand(3, generator=torch_generator(0, "tta", "sar", 1))
    b = torch.rand(3, generator=torch_generator(0, "tta", "sar", 1))
    c = torch.rand(3, generator=torch_generator(0, "tta", "sar", 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert [p.tolist() for p in micro_batches(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
