"""open_clip ViTs: 1-indexed raw residual tokens, position-embedding interpolation, text access."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anorefiner.backbones import build_backbone
from anorefiner.backbones.clip_vit import (POS_EMBED_RESIZE, default_vit_layers, interpolate_pos_embed,
                                           pos_embed_mode, with_pos_embed)


@pytest.fixture(scope="module")
def vit224():
    return build_backbone("ViT-B-16", 224, layers=[1, 6, 12], pretrained=None, seed=0)


def _hooked_open_clip_forward(bb, x, blocks):
    """open_clip's own ``visual(x)``, capturing resblock outputs with forward hooks."""
    seen = {}
    handles = [
        bb.visual.transformer.resblocks[i - 1].register_forward_hook(
            lambda _m, _inp, out, i=i: seen.__setitem__(i, out if bb.batch_first else out.transpose(0, 1))
        )
        for i in blocks
    ]
    try:
        with torch.no_grad():
            pooled = bb.visual(x)
    finally:
        for h in handles:
            h.remove()
    return seen, pooled


def test_tokens_are_the_raw_outputs_of_1_indexed_blocks(vit224):
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    layers, cls = vit224.forward(x)
    assert list(layers) == ["1", "6", "12"]
    seen, pooled = _hooked_open_clip_forward(vit224, x, [1, 6, 12])
    for i in (1, 6, 12):
        assert layers[str(i)].shape == (1, 14, 14, 768)
        torch.testing.assert_close(layers[str(i)], seen[i][:, 1:].reshape(1, 14, 14, 768))
    torch.testing.assert_close(cls, seen[12][:, 0])
    # ln_post + proj of the kept class token is CLIP's image embedding.
    torch.testing.assert_close(vit224.image_embedding(cls, normalize=False), pooled)


def test_other_resolution_uses_interpolated_position_embedding():
    bb = build_backbone("ViT-B-16", 160, pretrained=None, seed=0)
    assert bb.layers == ["3", "6", "9", "12"]
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    layers, cls = bb.forward(x)
    assert all(t.shape == (1, 10, 10, 768) for t in layers.values()) and cls.shape == (1, 768)
    # Same numbers as open_clip's own forward once its position embedding is swapped for ours.
    original = bb.visual.positional_embedding.data.clone()
    bb.visual.positional_embedding.data = bb.pos_embed.clone()
    try:
        seen, _ = _hooked_open_clip_forward(bb, x, [3, 12])
    finally:
        bb.visual.positional_embedding.data = original
    torch.testing.assert_close(layers["3"], seen[3][:, 1:].reshape(1, 10, 10, 768))
    torch.testing.assert_close(cls, seen[12][:, 0])
    assert bb.identity["resolution"] == 160 and bb.identity["activation"] == "gelu"


def test_sequence_first_transformers_give_the_same_tokens():
    from anorefiner._compat import import_open_clip

    transformer_cls = import_open_clip().transformer.Transformer
    bb = build_backbone("ViT-S-16", 32, layers=[2, 12], pretrained=None)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    layers, cls = bb.forward(x)
    old = bb.visual.transformer
    assert bb.batch_first  # open_clip 3.3's layout
    blk = old.resblocks[0]
    seq_first = transformer_cls(old.width, old.layers, blk.attn.num_heads, act_layer=type(blk.mlp.gelu),
                                norm_layer=type(blk.ln_1), batch_first=False)
    seq_first.load_state_dict(old.state_dict())
    bb.visual.transformer = seq_first.eval()
    assert not bb.batch_first
    layers2, cls2 = bb.forward(x)
    for name in ("2", "12"):
        torch.testing.assert_close(layers2[name], layers[name])
    torch.testing.assert_close(cls2, cls)


def test_interpolate_pos_embed_keeps_class_position():
    pos = torch.randn(1 + 4 * 4, 8, generator=torch.Generator().manual_seed(0))
    assert interpolate_pos_embed(pos, (4, 4), (4, 4)) is pos
    out = interpolate_pos_embed(pos, (4, 4), (6, 6))
    assert out.shape == (37, 8)
    assert torch.equal(out[0], pos[0])
    flat = torch.cat([pos[:1], torch.full((16, 8), 0.25)])
    torch.testing.assert_close(interpolate_pos_embed(flat, (4, 4), (7, 7))[1:], torch.full((49, 8), 0.25))
    with pytest.raises(ValueError, match="does not fit grid"):
        interpolate_pos_embed(pos, (5, 5), (6, 6))


def test_default_layers_are_depth_quarters():
    assert default_vit_layers(24) == [6, 12, 18, 24]
    assert default_vit_layers(12) == [3, 6, 9, 12]


def test_encode_text_is_normalised(vit224):
    emb = vit224.encode_text(["a photo of a flawless bottle", "a photo of a damaged bottle"])
    assert emb.shape == (2, 512)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    cls = vit224.forward(torch.zeros(1, 3, 224, 224))[1]
    sim = vit224.image_embedding(cls) @ emb.T
    assert sim.shape == (1, 2)


def test_bad_requests_name_the_value():
    with pytest.raises(ValueError, match="multiple of .* patch size 16"):
        build_backbone("ViT-S-16", 100, pretrained=None)
    with pytest.raises(ValueError, match="layer 13"):
        build_backbone("ViT-S-16", 64, layers=[13], pretrained=None)
    with pytest.raises(ValueError, match="not an open_clip tag"):
        build_backbone("ViT-S-16", 64, pretrained="no-such-tag")


@pytest.mark.slow
def test_vit_l_14_336_paper_layers_at_518():
    bb = build_backbone("ViT-L-14-336", 518, pretrained=None)
    assert bb.layers == ["6", "12", "18", "24"] and bb.patch_stride == 14 and bb.grid == (37, 37)
    assert bb.pos_embed.shape == (1 + 37 * 37, 1024)
    layers, cls = bb.forward(torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(0)))
    assert all(t.shape == (1, 37, 37, 1024) for t in layers.values())
    assert cls.shape == (1, 1024)
    assert bb.image_embedding(cls).shape == (1, 768)
    assert bb.activation == "gelu"  # what the official code runs at 518 px (methods.md, last section)
    assert F.normalize(bb.encode_text(["a photo"]), dim=-1).shape == (1, 768)


def test_activation_option_changes_tokens_and_defaults_to_gelu(tiny_clip):
    x = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(3))
    default = build_backbone(tiny_clip, 42, pretrained=None, seed=5)
    quick = build_backbone(tiny_clip, 42, pretrained=None, seed=5, activation="quick_gelu")
    assert default.activation == "gelu" and default.identity["activation"] == "gelu"
    assert quick.identity["activation"] == "quick_gelu"
    assert type(default.blocks[0].mlp.gelu) is torch.nn.GELU
    assert type(quick.blocks[0].mlp.gelu).__name__ == "QuickGELU"
    # Same random weights, different activation: different tokens.
    torch.testing.assert_close(default.blocks[0].mlp.c_fc.weight, quick.blocks[0].mlp.c_fc.weight)
    (a, cls_a), (b, cls_b) = default(x), quick(x)
    assert (a["4"] - b["4"]).abs().max() > 1e-3 and (cls_a - cls_b).abs().max() > 1e-3


def test_activation_is_validated(tiny_clip):
    with pytest.raises(ValueError, match="activation 'relu'"):
        build_backbone(tiny_clip, 42, pretrained=None, activation="relu")
    with pytest.raises(ValueError, match="open_clip ViT option"):
        build_backbone("resnet50", 64, pretrained=None, activation="gelu")
    with pytest.raises(ValueError, match="builds QuickGELU"):
        build_backbone("ViT-B-32-quickgelu", 224, pretrained=None, activation="gelu")


def test_tiny_clip_runs_both_towers(tiny_clip):
    bb = build_backbone(tiny_clip, 56, pretrained=None, seed=0)
    layers, cls = bb(torch.zeros(1, 3, 56, 56))
    assert bb.layers == ["1", "2", "3", "4"] and layers["4"].shape == (1, 4, 4, 64)
    assert bb.image_embedding(cls).shape == (1, 32)
    assert bb.encode_text(["a photo of a widget."]).shape == (1, 32)


def test_position_embedding_matches_open_clip_resize(tiny_clip):
    """Same as open_clip's resize_pos_embed (bicubic, antialias) that the official forks use at 518 px."""
    from anorefiner._compat import import_open_clip

    open_clip = import_open_clip()
    bb = build_backbone(tiny_clip, 70, pretrained=None, seed=0)
    target = open_clip.create_model(tiny_clip, pretrained=None, force_image_size=70)
    sd = {"visual.positional_embedding": bb.visual.positional_embedding.detach().clone()}
    open_clip.model.resize_pos_embed(sd, target)
    assert sd["visual.positional_embedding"].shape == (1 + 25, 64)
    torch.testing.assert_close(bb.pos_embed, sd["visual.positional_embedding"])


def _cubic(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic-convolution weights of the 4 neighbours at offsets -1, 0, 1, 2 (fraction ``t``)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _bicubic_half_pixel(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Float64 loop: plain bicubic resize, align_corners=False (source = (i + 0.5) * in/out - 0.5, unclamped),
    neighbours clamped to the border; AdaCLIP's and MuSc's ``resize_pos_embed`` (F.interpolate bicubic, no
    antialias)."""
    h, w = grid.shape
    out = np.zeros(size)
    for i in range(size[0]):
        y = (i + 0.5) * h / size[0] - 0.5
        y0 = math.floor(y)
        wy = _cubic(y - y0)
        for j in range(size[1]):
            x = (j + 0.5) * w / size[1] - 0.5
            x0 = math.floor(x)
            wx = _cubic(x - x0)
            for a in range(4):
                for b in range(4):
                    yy, xx = min(max(y0 - 1 + a, 0), h - 1), min(max(x0 - 1 + b, 0), w - 1)
                    out[i, j] += wy[a] * wx[b] * grid[yy, xx]
    return out


@pytest.mark.parametrize("new", [(7, 7), (5, 6), (3, 3)])
def test_bicubic_without_antialias_matches_a_float64_loop(new):
    """AdaCLIP's resize (caoyunkang/AdaCLIP@e27ee32 method/clip_model.py resize_pos_embed) on a float64 grid."""
    g = torch.Generator().manual_seed(3)
    pos = torch.randn(1 + 4 * 4, 3, generator=g, dtype=torch.float64)
    got = interpolate_pos_embed(pos, (4, 4), new, mode="bicubic_no_antialias")
    assert got.dtype == torch.float64 and torch.equal(got[0], pos[0])
    for ch in range(3):
        ref = _bicubic_half_pixel(pos[1:, ch].reshape(4, 4).numpy(), new)
        np.testing.assert_allclose(got[1:, ch].reshape(new).numpy(), ref, rtol=1e-12, atol=1e-12)
    # the antialiased default is another kernel: it differs, upsampling included
    assert not torch.allclose(interpolate_pos_embed(pos, (4, 4), new), got, atol=1e-3)
    with pytest.raises(ValueError, match="resize mode must be one of"):
        interpolate_pos_embed(pos, (4, 4), new, mode="nearest")


def test_with_pos_embed_gives_a_copy_with_the_other_resize(tiny_clip):
    bb = build_backbone(tiny_clip, 70, pretrained=None, seed=0)
    assert with_pos_embed(bb, "bicubic") is bb and bb.pos_embed_mode == "bicubic"
    other = with_pos_embed(bb, "bicubic_no_antialias")
    assert other.model is bb.model and other.pos_embed_mode == "bicubic_no_antialias"
    want = interpolate_pos_embed(bb.visual.positional_embedding.detach(), bb.native_grid, bb.grid,
                                 mode="bicubic_no_antialias")
    torch.testing.assert_close(other.pos_embed, want)
    assert not torch.allclose(other.pos_embed, bb.pos_embed)  # the backbone keeps its own
    assert "bicubic_no_antialias" in other.identity["pos_embed"] and "antialias" in bb.identity["pos_embed"]
    x = torch.randn(1, 3, 70, 70, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(other.forward(x)[1], bb.forward(x)[1])  # the copy's forward uses its embedding


def test_musc_resize_is_torch_plain_bicubic_on_the_fp32_grid(tiny_clip):
    """A backbone built with ``pos_embed="bicubic_no_antialias"`` (MuSc's backbone entry) holds what MuSc's vendored
    open_clip computes: ``F.interpolate(mode="bicubic", align_corners=False)`` with torch's default (no antialias)
    on the fp32 patch grid (xrli-U/MuSc@b76b93d models/backbone/open_clip/model.py l.436-441), bitwise; and the
    float64 loop of plain bicubic to float32 rounding. The default backbone keeps the antialiased resize."""
    musc = build_backbone(tiny_clip, 98, pretrained=None, seed=0, pos_embed="bicubic_no_antialias")
    native = musc.visual.positional_embedding.detach()
    (gh, gw), c = musc.native_grid, native.shape[1]
    grid = native[1:].float().reshape(1, gh, gw, c).permute(0, 3, 1, 2)
    torch_plain = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False)
    torch_plain = torch_plain.permute(0, 2, 3, 1).reshape(49, c)
    assert musc.grid == (7, 7) and musc.pos_embed_mode == "bicubic_no_antialias"
    assert torch.equal(musc.pos_embed[1:], torch_plain) and torch.equal(musc.pos_embed[0], native[0])
    grid64 = native[1:].double().reshape(gh, gw, c).numpy()
    for ch in (0, 17, c - 1):
        ref = _bicubic_half_pixel(grid64[:, :, ch], (7, 7))
        np.testing.assert_allclose(musc.pos_embed[1:, ch].reshape(7, 7).double().numpy(), ref, rtol=0, atol=1e-6)
    default = build_backbone(tiny_clip, 98, pretrained=None, seed=0)
    assert not torch.allclose(default.pos_embed, musc.pos_embed, atol=1e-4)
    assert torch.equal(with_pos_embed(default, "bicubic_no_antialias").pos_embed, musc.pos_embed)
    assert musc.identity["pos_embed"].startswith("bicubic_no_antialias ")
    assert pos_embed_mode(musc.identity["pos_embed"]) == "bicubic_no_antialias"
    assert pos_embed_mode(default.identity["pos_embed"]) == "bicubic"
    assert [pos_embed_mode(v) for v in (None, "", "nearest (2, 2)->(3, 3)")] == [None, None, None]


def test_pos_embed_option_is_validated(tiny_clip):
    with pytest.raises(ValueError, match="position embedding resize 'nearest' is not one of"):
        build_backbone(tiny_clip, 56, pretrained=None, pos_embed="nearest")
    with pytest.raises(ValueError, match="'pos_embed' is an open_clip ViT option"):
        build_backbone("efficientnet_lite0", 64, pos_embed="bicubic")


def test_cli_choices_are_the_backbone_modes():
    from anorefiner.commands import POS_EMBED_CHOICES

    assert POS_EMBED_CHOICES == POS_EMBED_RESIZE and POS_EMBED_CHOICES[0] == "bicubic"
