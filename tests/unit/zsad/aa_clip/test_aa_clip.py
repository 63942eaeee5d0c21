"""AA-CLIP: adapters, the three forwards, maps and scores against float64 loops; prompts; checkpoints; training;
the backend end to end from images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anorefiner.zsad.aa_clip.backend import (AaClipBackend, AaClipConfig, class_scores, detection_scores, full_map,
                                             gaussian_blur, level_map, load_adapters)
from anorefiner.zsad.aa_clip.model import (Adapters, adapted_visual, blend, class_text, default_until, dims_of,
                                           encode_text, surgery_attention, surgery_start, surgery_tokens,
                                           text_stage_features)
from anorefiner.zsad.aa_clip.prompts import REAL_NAMES, describe, sentences
from anorefiner.zsad.aa_clip.train import TrainConfig, geometric, train_aa_clip, train_backend
from anorefiner.zsad.april_gan.train import training_samples

from ..anomalyclip.test_anomalyclip import _attention_loop, _block_loop, _layer_norm
from ..reference import bilinear_align_corners


def _adapters(bb, seed=0, relu=False, dtype=torch.float64):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Adapters(*dims_of(bb), len(bb.layers), 2, 1, relu).to(dtype)


def _leaky(x):
    return np.where(x > 0, x, 0.01 * x)


def _blend_loop(x: np.ndarray, w_adapter: np.ndarray, weight: float) -> np.ndarray:
    """Per token: a = LeakyReLU(W x), rescaled to |x|, then w a + (1 - w) x."""
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        a = _leaky(w_adapter @ x[idx])
        out[idx] = weight * a * np.sqrt((x[idx] ** 2).sum()) / np.sqrt((a ** 2).sum()) + (1 - weight) * x[idx]
    return out


def test_blend_matches_the_float64_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 5, generator=g, dtype=torch.float64)
    got = blend(x, torch.nn.functional.leaky_relu(x @ w.T), 0.1)
    np.testing.assert_allclose(got.numpy(), _blend_loop(x.numpy(), w.numpy(), 0.1), rtol=1e-12, atol=1e-12)
    assert default_until(24, 6, 24) == 6 and default_until(12, 3, 12) == 3
    assert default_until(4, 6, 24) == 1 and default_until(2, 3, 12) == 1


def test_adapted_text_encoder_matches_the_loop(tiny64):
    ad = _adapters(tiny64, seed=1)
    model = tiny64.model
    from anorefiner.backbones.clip_prompting import tokenize

    tokens = tokenize(tiny64, ["a damaged widget.", "widget."])
    got = encode_text(tiny64, ad, tokens, 0.1).detach().numpy()
    x = (model.token_embedding(tokens) + model.positional_embedding).detach()
    for i, block in enumerate(model.transformer.resblocks):  # CLIP's own blocks; the blend is the new part
        x = block(x, attn_mask=model.attn_mask.double())
        if i < ad.text_until:
            w = ad.text_adapter[i].fc[0].weight.detach().numpy()
            x = torch.from_numpy(_blend_loop(x.detach().numpy(), w, 0.1))
    x = _layer_norm(x, model.ln_final).detach().numpy()
    proj = ad.text_adapter[-1].fc[0].weight.detach().numpy()
    for r, e in enumerate(tokens.argmax(-1).tolist()):
        np.testing.assert_allclose(got[r], _leaky(proj @ x[r, e]), rtol=1e-7, atol=1e-9)  # no text_projection


def test_class_text_is_the_normalised_mean_of_the_official_sentences(tiny64):
    normal, abnormal = sentences("bottle")
    assert normal == ["dark bottle.", "a photo of dark bottle.", "a dark bottle.", "a photo of a dark bottle.",
                      "the dark bottle.", "a photo of the dark bottle."]
    assert len(abnormal) == 10 and abnormal[0] == "a damaged dark bottle." and abnormal[-1].endswith("with damage.")
    assert describe("metal_nut", real_names=False) == "metal nut" and describe("widget") == "widget"
    assert len(REAL_NAMES) == 27 and describe("pcb1") == "dual ultrasonic distance sensor pcb module"
    with pytest.raises(ValueError, match="empty class name"):
        describe("")
    from anorefiner.backbones.clip_prompting import tokenize

    ad = _adapters(tiny64, seed=2)
    got = class_text(tiny64, ad, "bottle", 0.1).detach().numpy()
    for row, group in enumerate(sentences("bottle")):
        e = encode_text(tiny64, ad, tokenize(tiny64, group), 0.1).detach().numpy()
        m = (e / np.linalg.norm(e, axis=1, keepdims=True)).mean(0)
        np.testing.assert_allclose(got[row], m / np.linalg.norm(m), rtol=1e-10, atol=1e-12)


def test_adapted_visual_forward_matches_the_loop(tiny64):
    ad = _adapters(tiny64, seed=3)
    g = torch.Generator().manual_seed(4)
    batch = torch.randn(2, 3, 56, 56, generator=g, dtype=torch.float64)
    levels = [int(v) for v in tiny64.layers]
    seg, det = adapted_visual(tiny64, ad, batch, levels, 0.1)
    v = tiny64.visual
    x, taps = v.ln_pre(tiny64.embed(batch)), []
    for i, block in enumerate(tiny64.blocks):
        x = _block_loop(block, x)
        if i < ad.image_until:
            x = torch.from_numpy(_blend_loop(x.detach().numpy(), ad.image_adapter["layer_adapters"][i].fc[0].weight
                                             .detach().numpy(), 0.1))
        if i + 1 in levels:
            taps.append(_layer_norm(x[:, 1:], v.ln_post).detach().numpy())
    for j, t in enumerate(taps):
        p = t @ ad.image_adapter["seg_proj"][j].fc.weight.detach().numpy().T  # relu off: a plain linear map
        np.testing.assert_allclose(seg[j].detach().numpy(), p / np.linalg.norm(p, axis=-1, keepdims=True),
                                   rtol=1e-7, atol=1e-9)
    d = taps[-1] @ ad.image_adapter["det_proj"].fc.weight.detach().numpy().T
    ref = (d / np.linalg.norm(d, axis=-1, keepdims=True)).mean(1)  # mean of unit vectors, not renormalised
    np.testing.assert_allclose(det.detach().numpy(), ref, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="3 map levels"):
        adapted_visual(tiny64, ad, batch, levels[:3], 0.1)


def _surgery_loop(bb, batch, start: int, level: int, over_batch: bool):
    """Blocks from ``start``: v-v attention (per head, scale d^-0.5) over the images at each token position
    (``over_batch``) or over each image's tokens, then the block's FFN."""
    x = bb.visual.ln_pre(bb.embed(batch))
    for i, block in enumerate(bb.blocks, start=1):
        if i >= start:
            h = _layer_norm(x, block.ln_1)
            if over_batch:
                a = _attention_loop(block, h.transpose(0, 1), vv=True).transpose(0, 1)
            else:
                a = _attention_loop(block, h, vv=True)
            x = x + a
            x = x + block.mlp(_layer_norm(x, block.ln_2))
        else:
            x = _block_loop(block, x)
        if i == level:
            return x


def test_surgery_tower_attends_over_the_batch_as_the_official_layout_does(tiny64):
    g = torch.Generator().manual_seed(5)
    batch = torch.randn(3, 3, 56, 56, generator=g, dtype=torch.float64)
    assert surgery_start(24) == 6 and surgery_start(4) == 2 and surgery_start(4, 3) == 3
    with pytest.raises(ValueError, match="surgery_layer=9 must lie in 1..5"):
        surgery_start(4, 9)
    for axis, over in (("batch", True), ("tokens", False)):
        got = surgery_tokens(tiny64, batch, 4, 3, axis)
        torch.testing.assert_close(got, _surgery_loop(tiny64, batch, 3, 4, over), rtol=1e-7, atol=1e-9)
    # one image: the batch-axis softmax has a single entry, so the replaced attention is out_proj(v) itself
    block, h = tiny64.blocks[2], torch.randn(1, 17, 64, generator=g, dtype=torch.float64)
    attn = block.attn
    v = h @ attn.in_proj_weight[128:].T + attn.in_proj_bias[128:]
    torch.testing.assert_close(surgery_attention(block, h, "batch"), attn.out_proj(v))
    alone = surgery_tokens(tiny64, batch[:1], 4, 3, "batch")
    assert not torch.allclose(alone, surgery_tokens(tiny64, batch, 4, 3, "batch")[:1])  # the batch matters
    with pytest.raises(ValueError, match="surgery_axis"):
        surgery_tokens(tiny64, batch, 4, 3, "pixels")
    f = text_stage_features(tiny64, batch, 4, 3, "batch")
    v = tiny64.visual
    tok = _layer_norm(_surgery_loop(tiny64, batch, 3, 4, True)[:, 1:], v.ln_post) @ v.proj
    _, cls = tiny64.forward(batch)
    glob = _layer_norm(cls, v.ln_post) @ v.proj
    ref = tok / tok.norm(dim=-1, keepdim=True) + (glob / glob.norm(dim=-1, keepdim=True))[:, None]
    torch.testing.assert_close(f, ref, rtol=1e-7, atol=1e-9)


def _blur_loop(img: np.ndarray, k: int, sigma: float) -> np.ndarray:
    """kornia gaussian_blur2d: normalised exp(-x^2 / 2 s^2) taps, 'reflect' border (edge not repeated)."""
    r = k // 2
    w = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    w /= w.sum()
    n, m = img.shape

    def refl(i, size):
        return -i if i < 0 else 2 * (size - 1) - i if i >= size else i

    out = np.zeros_like(img)
    for y in range(n):
        for x in range(m):
            out[y, x] = sum(w[a + r] * w[b + r] * img[refl(y + a, n), refl(x + b, m)]
                            for a in range(-r, r + 1) for b in range(-r, r + 1))
    return out


def test_maps_and_scores_match_the_float64_loop():
    g = torch.Generator().manual_seed(6)
    b, h, d, size = 2, 5, 6, 11
    text = torch.nn.functional.normalize(torch.randn(2, d, generator=g, dtype=torch.float64), dim=-1)
    seg = [torch.nn.functional.normalize(torch.randn(b, h * h, d, generator=g, dtype=torch.float64), dim=-1)
           for _ in range(2)]
    got = full_map(seg, text, (h, h), size, 100.0, 3, 1.0).numpy()
    ref = np.zeros((b, size, size))
    for f in seg:
        for i in range(b):
            s = np.zeros((h, h))
            for p in range(h * h):
                cos = [float((f[i, p] * text[c]).sum()) for c in range(2)]
                s[p // h, p % h] = (100 * cos[1] + 1 - 100 * cos[0]) / 2
            ref[i] += bilinear_align_corners(_blur_loop(s, 3, 1.0), size)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-9)
    blurred = gaussian_blur(torch.from_numpy(ref[:1, None]), 7, 1.5)[0, 0].numpy()
    np.testing.assert_allclose(blurred, _blur_loop(ref[0], 7, 1.5), rtol=1e-10, atol=1e-10)
    assert level_map(seg[0], text, (h, h), 100.0, 3, 1.0).shape == (b, 1, h, h)
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(torch.zeros(1, 1, 5, 5), 4, 1.0)
    with pytest.raises(ValueError, match="larger than 3"):
        gaussian_blur(torch.zeros(1, 1, 3, 3), 7, 1.0)
    det = torch.randn(3, d, generator=g, dtype=torch.float64)
    scores = detection_scores(det, text).numpy()
    for i in range(3):
        assert scores[i] == pytest.approx((float((det[i] * text[1]).sum()) + 1) / 2, rel=1e-12)
    top, lo, hi = np.array([2.0, 3.0, 5.0]), 1.0, 6.0  # map maxima, the stack's full-size min and max
    dets = np.array([0.2, 0.6, 0.4])
    want = [0.5 * (t - lo) / (hi - lo) + 0.5 * (s - 0.2) / 0.4 for t, s in zip(top, dets)]
    np.testing.assert_allclose(class_scores(top, dets, lo, hi, 0.5), want, rtol=1e-12)
    np.testing.assert_allclose(class_scores(top, dets, lo, hi, 0.5, normalise=False), 0.5 * top + 0.5 * dets)


# ---------------------------------------------------------------- checkpoints
def _save(path, ad, meta=None):
    obj = {"text_adapter": ad.text_adapter.state_dict(), "image_adapter": ad.image_adapter.state_dict()}
    torch.save({**obj, "meta": meta} if meta else obj, path)
    return path


def test_checkpoint_round_trip_and_errors(tiny56, tmp_path):
    ad = _adapters(tiny56, seed=7, dtype=torch.float32)
    assert set(ad.image_adapter.state_dict()) == {"layer_adapters.0.fc.0.weight", "layer_adapters.1.fc.0.weight",
                                                  "det_proj.fc.weight",
                                                  *(f"seg_proj.{i}.fc.weight" for i in range(4))}
    assert set(ad.text_adapter.state_dict()) == {"0.fc.0.weight", "1.fc.0.weight"}  # 1 adapter + the projection
    loaded, meta = load_adapters(_save(tmp_path / "ok.pt", ad), tiny56)
    assert meta == {} and (loaded.image_until, loaded.text_until) == (2, 1)
    for part in ("text_adapter", "image_adapter"):
        for k, v in getattr(ad, part).state_dict().items():
            assert torch.equal(getattr(loaded, part).state_dict()[k], v), k
    relu = load_adapters(_save(tmp_path / "relu.pt", _adapters(tiny56, relu=True, dtype=torch.float32)))[0]
    assert isinstance(relu.image_adapter["det_proj"].fc, torch.nn.Sequential)  # the keys say relu
    bad = _adapters(tiny56, dtype=torch.float32)
    bad.image_adapter["seg_proj"][1].fc = torch.nn.Linear(64, 8, bias=False)
    with pytest.raises(ValueError, match=r"shape.pt: image_adapter.seg_proj.1.fc.weight has shape \(8, 64\), expe"):
        load_adapters(_save(tmp_path / "shape.pt", bad), tiny56)
    torch.save({"image_adapter": ad.image_adapter.state_dict()}, tmp_path / "half.pt")
    with pytest.raises(ValueError, match="half.pt: needs the state dicts"):
        load_adapters(tmp_path / "half.pt")
    state = ad.image_adapter.state_dict()
    del state["det_proj.fc.weight"]
    torch.save({"text_adapter": ad.text_adapter.state_dict(), "image_adapter": state}, tmp_path / "key.pt")
    with pytest.raises(ValueError, match="key.pt: missing key 'det_proj.fc.weight'"):
        load_adapters(tmp_path / "key.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_adapters(tmp_path / "nope.pt")


# ---------------------------------------------------------------- training and the backend
def test_geometric_augmentation_moves_image_and_mask_together():
    x = torch.zeros(4, 28, 28)
    x[:, 5:12, 8:20] = 1.0
    for a in ({"angle": 17.0}, {"translate": [3, -4]}, {"hflip": True, "vflip": True},
              {"angle": -25.0, "translate": [-2, 5], "hflip": True}):
        out = geometric(x, a)
        assert torch.equal(out[0], out[3]) and set(out.unique().tolist()) <= {0.0, 1.0}  # nearest, fill 0
    assert torch.equal(geometric(x, {"hflip": True})[3], x[3].flip(-1))


def test_both_stages_train_and_are_deterministic(tiny56, demo_dataset, tmp_path):
    rows = training_samples(demo_dataset, "demo", max_images=3)
    cfg = TrainConfig(text_epochs=1, image_epochs=1, text_batch_size=4, image_batch_size=2, seed=5, workers=2)
    assert TrainConfig().epochs == 25 and cfg.epochs == 2
    out = train_aa_clip(tiny56, rows, cfg, tmp_path / "a.pt")
    obj = torch.load(out, weights_only=True)
    meta = obj["meta"]
    assert len(meta["epoch_text_losses"]) == 1 and np.isfinite(meta["epoch_losses"]).all()
    assert meta["levels"] == [1, 2, 3, 4] and meta["surgery_start"] == 2 and meta["real_names"] is True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        init = Adapters(*dims_of(tiny56), 4, 1, 1, False)
    for part in ("text_adapter", "image_adapter"):  # both stages moved their adapters
        assert any(not torch.equal(v, getattr(init, part).state_dict()[k]) for k, v in obj[part].items()), part
    again = train_backend(tiny56, demo_dataset, "demo", TrainConfig(text_epochs=1, image_epochs=1, text_batch_size=4,
                                                                    image_batch_size=2, seed=5, workers=1,
                                                                    max_images=3), tmp_path / "b.pt")
    obj2 = torch.load(again, weights_only=True)
    for part in ("text_adapter", "image_adapter"):
        for k, v in obj[part].items():
            assert torch.equal(v, obj2[part][k]), (part, k)
    with pytest.raises(ValueError, match="no training images"):
        train_aa_clip(tiny56, [], cfg, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="surgery_axis"):
        train_aa_clip(tiny56, rows, TrainConfig(surgery_axis="x"), tmp_path / "x.pt")


def test_backend_end_to_end_from_images(tiny56, demo_dataset, tmp_path):
    from types import SimpleNamespace

    from anorefiner.config import ConfigError, from_dict
    from anorefiner.data.index import index_category, load_image

    paths = list(index_category(demo_dataset, "widget", dataset="demo").image_path)[:5]
    ck = _save(tmp_path / "a.pt", _adapters(tiny56, seed=8, dtype=torch.float32),
               meta={"text_adapt_weight": 0.1, "image_adapt_weight": 0.1, "real_names": True})
    opts = {"checkpoint": str(ck), "class_name": "widget", "device": "cpu", "batch_size": 2, "blur_kernel": 3}
    backend = AaClipBackend(from_dict(AaClipConfig, opts), backbone=tiny56)
    feats = SimpleNamespace(ids=[f"i{i}" for i in range(len(paths))], layers={}, cls=None)
    with pytest.raises(ValueError, match="needs --data-root"):
        backend.coarse(feats)
    backend.images = lambda idx: [load_image(paths[i]) for i in idx]
    result = backend.coarse(feats)
    assert result.maps.shape == (5, 4, 4) and result.scores.shape == (5,)
    assert result.maps.min() >= 0 and result.maps.max() <= 1  # the class min-max of the full-size stack
    assert backend.last_info["levels"] == [1, 2, 3, 4] and backend.last_info["class_minmax"]
    # the stored map is the area mean of the official full-size map, normalised with the stack's min / max
    out = backend.score_batch(tiny56.preprocess(backend.images([0, 1, 2, 3, 4])))
    lo, hi = float(out["full"].min()), float(out["full"].max())
    from anorefiner.zsad.april_gan.backend import patch_map

    np.testing.assert_allclose(result.maps, (patch_map(out["full"], (4, 4)).numpy() - lo) / (hi - lo), rtol=1e-5,
                               atol=1e-6)
    want = class_scores(out["max"].double().numpy(), out["det"].double().numpy(), lo, hi, 0.5)
    np.testing.assert_allclose(result.scores, want, rtol=1e-5, atol=1e-6)
    raw = AaClipBackend(from_dict(AaClipConfig, {**opts, "class_minmax": False, "batch_size": 5}), backbone=tiny56,
                        images=backend.images).coarse(feats)
    np.testing.assert_allclose(raw.maps, patch_map(out["full"], (4, 4)).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="PGT cannot score"):
        backend.score_queries({}, None, feats, [0], [None])
    with pytest.raises(ValueError, match="trained with image_adapt_weight=0.1, option image_adapt_weight is 0.2"):
        AaClipBackend(from_dict(AaClipConfig, {**opts, "image_adapt_weight": 0.2}), backbone=tiny56)
    with pytest.raises(ValueError, match="needs option 'checkpoint'"):
        AaClipBackend(AaClipConfig(class_name="widget"), backbone=tiny56)
    with pytest.raises(ConfigError, match="blur_kernal"):
        from_dict(AaClipConfig, {**opts, "blur_kernal": 3})
    with pytest.raises(ValueError, match="empty category"):
        AaClipBackend(from_dict(AaClipConfig, opts), backbone=tiny56, images=backend.images).coarse(
            SimpleNamespace(ids=[], layers={}, cls=None))
    assert math.isfinite(float(result.scores.sum()))
