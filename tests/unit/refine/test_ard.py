"""ARD (paper Sec. 3.1): ζ at initialisation, shapes, every ablation switch, BI (Eq. 3)."""

import pytest
import torch

from anorefiner.refine.ard import (ARD, AnomalyAttention, ARDConfig, BidirectionalInteraction, build_refiner,
                                   fuse_layers)

SMALL = dict(feat_channels=16, anomaly_channels=8, aa_channels=12, head_channels=8)

# Variants of docs/architecture.md (Tables 2, 3, 11) as ard overrides.
SWITCHES = {
    "default": {},
    "ard_none": dict(anob=False, attention="none", bi=False),
    "ard_anob": dict(attention="none", bi=False),
    "ard_anob_aa": dict(bi=False),
    "sa": dict(attention="sa"),
    "no_zeta": dict(aa_zeta=False),
    "no_w": dict(aa_weight=False),
    "plain_sa": dict(anob=False, attention="sa", bi=False),
    "ar_channels": dict(ar_channels=(16, 8)),
    "no_norm": dict(norm="none"),
    "decoder_destseg": dict(decoder="destseg"),
    "decoder_realnet": dict(decoder="realnet"),
    "decoder_unet": dict(decoder="unet"),
}


def test_zeta_is_one_at_initialisation():
    torch.manual_seed(0)
    aa = AnomalyAttention(16, 16, 12, grid=(6, 6))
    y_fuse = torch.randn(3, 12, 6, 6) * 10
    assert torch.equal(aa.zeta(y_fuse), torch.ones_like(y_fuse))
    # and not afterwards once β moves: the test can fail
    with torch.no_grad():
        aa.beta.add_(0.5)
    assert not torch.allclose(aa.zeta(y_fuse), torch.ones_like(y_fuse))


def test_beta_has_one_value_per_block_position():
    model = ARD(10, ARDConfig(**SMALL), grid=(5, 7), patch_stride=8)
    assert tuple(model.block1.attention.beta.shape) == (1, 1, 10, 14)
    assert tuple(model.block2.attention.beta.shape) == (1, 1, 20, 28)


@pytest.mark.parametrize("grid,stride", [((4, 4), 8), ((6, 6), 14), ((5, 7), 8), ((3, 3), 16)])
def test_output_shapes(grid, stride):
    torch.manual_seed(0)
    model = ARD(10, ARDConfig(**SMALL), grid=(4, 4), patch_stride=stride)  # other grids resize β
    h, w = grid
    out = model(torch.randn(2, 10, h, w), torch.rand(2, 1, h, w))
    assert tuple(out.shape) == (2, 1, h * stride, w * stride)
    out = model(torch.randn(1, 10, h, w), torch.rand(1, 1, h, w), out_size=(50, 60))
    assert tuple(out.shape) == (1, 1, 50, 60)


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_every_switch_builds_and_trains(name):
    torch.manual_seed(0)
    cfg = ARDConfig(**{**SMALL, **SWITCHES[name]})
    model = build_refiner(10, cfg, grid=(4, 4), patch_stride=8)
    x, c = torch.randn(2, 10, 4, 4), torch.rand(2, 1, 4, 4)
    out = model(x, c)
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: parameters without gradient {missing}"
    if cfg.decoder == "ard":
        assert (model.anob is None) == (not cfg.anob)
        assert (model.bi is None) == (not cfg.bi)


def test_no_anob_ignores_the_coarse_map_and_anob_uses_it():
    torch.manual_seed(0)
    x = torch.randn(1, 10, 4, 4)
    plain = ARD(10, ARDConfig(**SMALL, anob=False, bi=False), grid=(4, 4), patch_stride=8).eval()
    assert torch.equal(plain(x, torch.zeros(1, 1, 4, 4)), plain(x, torch.ones(1, 1, 4, 4)))
    full = ARD(10, ARDConfig(**SMALL), grid=(4, 4), patch_stride=8).eval()
    assert not torch.equal(full(x, torch.zeros(1, 1, 4, 4)), full(x, torch.ones(1, 1, 4, 4)))


def test_bi_requires_anob():
    with pytest.raises(ValueError, match="anob"):
        ARD(10, ARDConfig(anob=False, bi=True))


@pytest.mark.parametrize("key,value", [("attention", "cbam"), ("decoder", "fpn"), ("feature_fusion", "sum")])
def test_bad_option_names_the_key(key, value):
    with pytest.raises(ValueError, match=f"ard.{key}"):
        ARD(10, ARDConfig(**{key: value}))


def test_bi_updates_use_pre_update_tensors():
    torch.manual_seed(0)
    bi = BidirectionalInteraction(6, 4)
    f, a = torch.randn(1, 6, 5, 5), torch.randn(1, 4, 5, 5)
    f2, a2 = bi(f, a)
    assert torch.allclose(f2, f + bi.a_to_f(a))
    assert torch.allclose(a2, a + bi.f_to_a(f))


def test_fuse_layers_mean_and_concat():
    same = {"6": torch.ones(2, 3, 3, 4).numpy(), "12": (3 * torch.ones(2, 3, 3, 4)).numpy()}
    out = fuse_layers(same)  # auto → mean
    assert out.shape == (2, 4, 3, 3) and torch.allclose(out, torch.full_like(out, 2.0))
    assert fuse_layers(same, "concat").shape == (2, 8, 3, 3)
    mixed = {"blocks.2": torch.zeros(2, 3, 3, 4).numpy(), "blocks.4": torch.zeros(2, 3, 3, 6).numpy()}
    assert fuse_layers(mixed).shape == (2, 10, 3, 3)  # auto → concat
    with pytest.raises(ValueError, match="concat"):
        fuse_layers(mixed, "mean")


def test_coarse_skip_adds_the_logit_of_the_upsampled_coarse_map():
    torch.manual_seed(0)
    cfg = ARDConfig(**SMALL, coarse_skip=True)
    model = ARD(5, cfg, grid=(4, 4), patch_stride=4).eval()
    plain = ARD(5, ARDConfig(**SMALL), grid=(4, 4), patch_stride=4).eval()
    plain.load_state_dict(model.state_dict())
    x, c = torch.randn(2, 5, 4, 4), torch.rand(2, 1, 4, 4) * 1.4 - 0.2  # normalised maps can leave [0, 1]
    with torch.no_grad():
        skip, base = model(x, c), plain(x, c)
    # slow reference: bilinear upsampling (half-pixel centres) pixel by pixel, then clamp and logit in float64
    ref = torch.zeros(2, 1, 16, 16, dtype=torch.float64)
    src = c.double()
    for b in range(2):
        for i in range(16):
            for j in range(16):
                y, xx = min(max((i + 0.5) / 4 - 0.5, 0), 3), min(max((j + 0.5) / 4 - 0.5, 0), 3)
                y0, x0 = int(y), int(xx)
                y1, x1 = min(y0 + 1, 3), min(x0 + 1, 3)
                wy, wx = y - y0, xx - x0
                v = ((1 - wy) * (1 - wx) * src[b, 0, y0, x0] + (1 - wy) * wx * src[b, 0, y0, x1]
                     + wy * (1 - wx) * src[b, 0, y1, x0] + wy * wx * src[b, 0, y1, x1])
                v = min(max(float(v), 1e-3), 1 - 1e-3)
                ref[b, 0, i, j] = torch.log(torch.tensor(v / (1 - v), dtype=torch.float64))
    assert torch.allclose((skip - base).double(), ref, atol=1e-4)
    with pytest.raises(ValueError, match="coarse_skip_eps"):
        ARDConfig(coarse_skip_eps=0.7).validate()
