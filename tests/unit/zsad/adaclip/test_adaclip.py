"""AdaCLIP: prompt insertion, map, HSF and losses against float64 loops; checkpoints; training; the backend."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from anorefiner.backbones import build_backbone
from anorefiner.config import ConfigError, from_dict
from anorefiner.data.index import load_image
from anorefiner.zsad.adaclip.backend import (ADACLIP_PROMPTS, AdaClipBackend, AdaClipConfig, class_bank, hsf, hsf_counts,
                                     hsf_feature, image_probs, official_map)
from anorefiner.zsad.adaclip.prompts import (KEY_PREFIX, AdaClipModel, load_model, prompted_text, prompted_visual,
                                             state_for_checkpoint)
from anorefiner.zsad.adaclip.train import TrainConfig, check_checkpoint, train_backend, train_prompts
from anorefiner.zsad.april_gan.train import training_samples

from ..reference import bilinear_align_corners


@pytest.fixture(scope="module")
def tiny56_f64(tiny_clip):
    bb = build_backbone(tiny_clip, 56, pretrained=None, seed=1)
    bb.model.double()
    bb.pos_embed = bb.pos_embed.double()
    return bb


def _model(bb, seed=0, dtype=torch.float64, scale=1.0):
    torch.manual_seed(seed)
    m = AdaClipModel.for_backbone(bb, length=3, depth=3).to(dtype)
    with torch.no_grad():  # larger prompts than N(0, 0.02), so a wrong position would show
        for p in list(m.visual_prompter.static_prompts) + list(m.text_prompter.static_prompts):
            p.mul_(scale)
    return m


def _entering(p: torch.Tensor, precision: str) -> torch.Tensor:
    """The official ``.half()`` of a prompt (method/adaclip.py l.87/118/123), promoted back by ``torch.cat``."""
    return p.half().double() if precision == "float16" else p


@pytest.mark.parametrize("precision", ["float16", "float32"])
def test_visual_prompts_append_then_replace_like_a_manual_loop(tiny56_f64, precision):
    bb = tiny56_f64
    m = _model(bb, scale=20.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 56, 56, generator=g, dtype=torch.float64)
    dyn = torch.randn(2, 3, bb.width, generator=g, dtype=torch.float64)
    tokens, pooled = prompted_visual(bb, m, x, dyn, precision)
    v = bb.visual
    for b in range(2):  # one image at a time, prompts written by index
        seq = v.ln_pre(bb.embed(x[b : b + 1]))[0]
        n = seq.shape[0]
        want = {}
        for i, block in enumerate(v.transformer.resblocks, start=1):
            if i == 1:
                seq = torch.cat([seq, torch.zeros(3, seq.shape[1], dtype=seq.dtype)])
            if i <= 3:
                for r in range(3):
                    seq[n + r] = _entering(dyn[b, r] + m.visual_prompter.static_prompts[i - 1][r], precision)
            seq = block(seq[None])[0] if bb.batch_first else block(seq[:, None])[:, 0]
            want[i] = seq[1:n].clone()
        for k, tok in zip(bb.layers, tokens):
            np.testing.assert_allclose(tok[b].detach().numpy(), want[int(k)].detach().numpy(), rtol=1e-5, atol=1e-7)
        ref = (v.ln_post(seq[0]) @ v.proj).detach().numpy()
        np.testing.assert_allclose(pooled[b].detach().numpy(), ref, rtol=1e-5, atol=1e-7)
    # the prompts matter (a forward without them differs), and so does their rounding
    layers, _ = bb.forward(x)
    assert not torch.allclose(layers[bb.layers[-1]].reshape(2, -1, bb.width), tokens[-1])
    other = prompted_visual(bb, m, x, dyn, "float32" if precision == "float16" else "float16")[0]
    assert not torch.allclose(other[-1], tokens[-1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("precision", ["float16", "float32"])
def test_text_prompts_overwrite_positions_after_block_one_like_a_manual_loop(tiny56_f64, precision):
    bb = tiny56_f64
    m = _model(bb, scale=20.0)
    bank = class_bank(bb, "metal-nut")
    assert bank.n == len(ADACLIP_PROMPTS.normal + ADACLIP_PROMPTS.abnormal) * 4 and bank.n_normal == 28
    g = torch.Generator().manual_seed(1)
    wt = bb.model.token_embedding.weight.shape[1]
    dyn = torch.randn(2, 3, wt, generator=g, dtype=torch.float64)
    got = prompted_text(bb, m, bank, dyn, precision)
    model = bb.model
    for b in range(2):
        embs = []
        for s in range(bank.n):
            toks = bank.tokens[s]
            x = model.token_embedding(toks).double() + model.positional_embedding
            for i, block in enumerate(model.transformer.resblocks, start=1):
                if 2 <= i <= 3:
                    for r in range(3):
                        x[1 + r] = _entering(dyn[b, r] + m.text_prompter.static_prompts[i - 1][r], precision)
                x = block(x[None], attn_mask=model.attn_mask)[0]
            e = model.ln_final(x)[int(toks.argmax())] @ model.text_projection
            embs.append((e / e.norm()).detach().numpy())
        embs = np.array(embs)
        for c, part in enumerate((embs[:28], embs[28:])):
            mean = part.mean(0)
            np.testing.assert_allclose(got[b, c].detach().numpy(), mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-7)
    other = prompted_text(bb, m, bank, dyn, "float32" if precision == "float16" else "float16")
    assert not torch.allclose(other, got, rtol=1e-6, atol=1e-8)


def test_map_and_hsf_score_match_float64_loops():
    g = torch.Generator().manual_seed(2)
    n, h, w, d, size, n_layers = 2, 3, 3, 5, 8, 3
    feats = [torch.nn.functional.normalize(torch.randn(n, h * w, d, generator=g, dtype=torch.float64), dim=-1)
             for _ in range(n_layers)]
    text = torch.nn.functional.normalize(torch.randn(n, 2, d, generator=g, dtype=torch.float64), dim=-1) * 0.1
    logits = [100 * torch.einsum("bpd,bcd->bcp", f, text).reshape(n, 2, h, w) for f in feats]
    got = official_map(logits, size).numpy()
    for b in range(n):
        up = [np.stack([bilinear_align_corners(lg[b, c].numpy(), size) for c in range(2)]) for lg in logits]
        mean = sum(up) / n_layers
        ref = np.exp(mean[1]) / (np.exp(mean[0]) + np.exp(mean[1]))
        np.testing.assert_allclose(got[b], ref, rtol=1e-5, atol=1e-9)

    # HSF with a given clustering: top 5k tokens by p_abn of the layer-mean token logits
    cls = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    k = 1  # top 5 of 9 tokens
    labels = [np.array([0, 1, 1, 0, 1]), np.array([2, 0, 0, 1, 1])]
    flat = [lg.flatten(2).transpose(1, 2) for lg in logits]
    fused = hsf(feats, flat, k, seed=0, labels=labels)
    probs = image_probs(cls, text, 100.0, fused, 0.2).numpy()
    for b in range(n):
        tok = np.array([[sum(lg[b, c].numpy().reshape(-1)[p] for lg in logits) / n_layers for c in range(2)]
                        for p in range(h * w)])
        pab = np.exp(tok[:, 1]) / np.exp(tok).sum(1)
        top = sorted(range(h * w), key=lambda p: -pab[p])[:5]
        centres = []
        for c in sorted(set(labels[b].tolist())):
            members = [feats[l][b, top[t]].numpy() for l in range(n_layers) for t in range(5) if labels[b][t] == c]
            centres.append(np.mean(members, 0))
        hv = np.mean(centres, 0)
        hv = hv / np.linalg.norm(hv)
        np.testing.assert_allclose(fused[b].numpy(), hv, rtol=1e-5, atol=1e-9)
        f = 0.2 * hv + 0.8 * cls[b].numpy()
        f = f / np.linalg.norm(f)
        z = 100 * text[b].numpy() @ f
        np.testing.assert_allclose(probs[b], np.exp(z) / np.exp(z).sum(), rtol=1e-5, atol=1e-9)


def test_hsf_is_deterministic_for_a_seed_and_clamps_to_few_tokens():
    g = torch.Generator().manual_seed(3)
    feats = [torch.nn.functional.normalize(torch.randn(2, 200, 6, generator=g), dim=-1) for _ in range(2)]
    logits = [torch.randn(2, 200, 2, generator=g) for _ in range(2)]
    a, b = hsf(feats, logits, 20, seed=7), hsf(feats, logits, 20, seed=7)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert hsf_counts(200, 20) == (100, 20) and hsf_counts(16, 20) == (16, 16) and hsf_counts(3, 20) == (3, 3)
    small = hsf([f[:, :16] for f in feats], [lg[:, :16] for lg in logits], 20, seed=0)
    assert torch.isfinite(small).all() and small.shape == (2, 6)
    # an empty cluster is skipped, not a NaN
    out = hsf_feature([feats[0][0, :4], feats[1][0, :4]], np.array([0, 0, 2, 2]))
    assert torch.isfinite(out).all()


def test_checkpoint_round_trip_and_errors(tiny56, tmp_path):
    torch.manual_seed(0)
    m = AdaClipModel.for_backbone(tiny56)
    path = tmp_path / "ck.pt"
    state = state_for_checkpoint(m)
    assert all(k.startswith(KEY_PREFIX) for k in state)
    assert KEY_PREFIX + "dynamic_visual_prompt_generator.head.4.weight" in state
    assert tuple(state[KEY_PREFIX + "visual_prompter.static_prompts.3"].shape) == (5, 64)
    assert tuple(state[KEY_PREFIX + "text_prompter.static_prompts.0"].shape) == (5, 32)
    torch.save({**state, "meta": {"note": "x"}}, path)
    back = load_model(path, tiny56)
    for k, v in back.state_dict().items():
        assert torch.equal(v, state[KEY_PREFIX + k])
    check_checkpoint(path, tiny56)

    bad = dict(state)
    bad[KEY_PREFIX + "patch_token_layer.head.1.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"shape\.pt.*patch_token_layer\.head\.1\.weight"):
        check_checkpoint(tmp_path / "shape.pt")
    bad = {k.replace("cls_token_layer", "cls_layer"): v for k, v in state.items()}
    torch.save(bad, tmp_path / "keys.pt")
    with pytest.raises(ValueError, match=r"keys\.pt.*cls_token_layer"):
        check_checkpoint(tmp_path / "keys.pt")
    extra = {**state, KEY_PREFIX + "visual_prompter.extra": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="unexpected keys"):
        check_checkpoint(tmp_path / "extra.pt")
    other = AdaClipModel(visual=64, text=32, embed=32, layers=3)
    torch.save(state_for_checkpoint(other), tmp_path / "layers.pt")
    with pytest.raises(ValueError, match=r"layers\.pt.*layers size 3"):
        check_checkpoint(tmp_path / "layers.pt", tiny56)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        check_checkpoint(tmp_path / "nowhere.pt")


def test_one_epoch_training_is_finite_and_deterministic(tiny56, demo_dataset, tmp_path):
    rows = training_samples(demo_dataset, "demo", max_images=1)
    assert len(rows) == 2
    cfg = TrainConfig(epochs=1, k_clusters=4)
    a = train_prompts(tiny56, rows, cfg, tmp_path / "a" / "ck.pt")
    b = train_prompts(tiny56, rows, cfg, tmp_path / "b.pt")
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert all(math.isfinite(v) for v in sa["meta"]["epoch_losses"])
    assert sa["meta"]["epoch_losses"] == sb["meta"]["epoch_losses"]
    torch.manual_seed(cfg.seed)
    init = state_for_checkpoint(AdaClipModel.for_backbone(tiny56))
    moved = 0
    for k, v in sa.items():
        if k != "meta":
            assert torch.equal(v, sb[k]) and torch.isfinite(v).all()
            moved += not torch.equal(v, init[k])
    assert moved > 0  # the optimiser changed the parameters
    check_checkpoint(a, tiny56)
    with pytest.raises(ValueError, match="batch_size 2"):
        train_prompts(tiny56, rows, TrainConfig(batch_size=2), tmp_path / "c.pt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train_backend(tiny56, tmp_path / "nowhere", "visa", cfg, tmp_path / "d.pt")


def test_backend_end_to_end_from_images(tiny56, demo_dataset, tmp_path):
    torch.manual_seed(0)
    ck = tmp_path / "ck.pt"
    torch.save(state_for_checkpoint(AdaClipModel.for_backbone(tiny56)), ck)
    rows = [r for r in training_samples(demo_dataset, "demo", max_images=3) if r["category"] == "tiles"]
    paths = [r["image"] for r in rows]
    opts = {"checkpoint": str(ck), "class_name": "tiles", "device": "cpu", "batch_size": 2}
    backend = AdaClipBackend(from_dict(AdaClipConfig, opts), backbone=tiny56, seed=5)
    with pytest.raises(ValueError, match="data-root"):
        backend.coarse(SimpleNamespace(ids=["a"]))
    backend.images = lambda idx: [load_image(paths[i]) for i in idx]
    res = backend.coarse(SimpleNamespace(ids=[str(i) for i in range(len(paths))]))
    assert res.maps.shape == (3, 4, 4) and res.scores.shape == (3,)
    assert np.isfinite(res.maps).all() and 0 <= res.maps.min() and res.maps.max() <= 1
    assert np.isfinite(res.scores).all() and ((0 <= res.scores) & (res.scores <= 1)).all()
    assert backend.last_info["map_level"].startswith("token grid")
    feats, maps, scores = backend.features_and_scores([2, 0])
    assert set(feats) == set(tiny56.layers) and feats["4"].shape == (2, 4, 4, 32)
    np.testing.assert_allclose(feats["4"].norm(dim=-1).numpy(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(maps.numpy(), res.maps[[2, 0]], rtol=1e-5, atol=1e-6)  # batching changes nothing
    np.testing.assert_allclose(scores.numpy(), res.scores[[2, 0]], rtol=1e-5, atol=1e-6)
    frozen = AdaClipBackend(from_dict(AdaClipConfig, {**opts, "cls_input": "frozen"}), backbone=tiny56, seed=5,
                            images=backend.images)
    _, maps_f, scores_f = frozen.features_and_scores([2, 0])
    assert torch.equal(maps_f, maps) and not torch.allclose(scores_f, scores)  # only the image score changes
    # the official precision choices are the defaults; the alternatives change the maps
    assert backend.backbone.pos_embed_mode == "bicubic_no_antialias" and backend.backbone.model is tiny56.model
    assert tiny56.pos_embed_mode == "bicubic"  # the shared backbone keeps its own embedding
    assert (backend.last_info["pos_embed"], backend.last_info["prompt_precision"]) == ("bicubic_no_antialias",
                                                                                      "float16")
    for alt in ({"pos_embed": "bicubic"}, {"prompt_precision": "float32"}):
        other = AdaClipBackend(from_dict(AdaClipConfig, {**opts, **alt}), backbone=tiny56, seed=5,
                               images=backend.images)
        assert not torch.allclose(other.features_and_scores([2, 0])[1], maps, rtol=0, atol=1e-7), alt
    with pytest.raises(NotImplementedError, match="PGT"):
        backend.score_queries(None, None, None, None, None)


def test_bad_options_are_named(tiny56, tmp_path):
    with pytest.raises(ConfigError, match="temprature"):
        from_dict(AdaClipConfig, {"temprature": 1.0}, "backends.adaclip.options")
    with pytest.raises(ValueError, match="checkpoint"):
        AdaClipBackend(AdaClipConfig(class_name="tiles"), backbone=tiny56)
    torch.save(state_for_checkpoint(AdaClipModel.for_backbone(tiny56)), tmp_path / "ck.pt")
    with pytest.raises(ValueError, match="class_name"):
        AdaClipBackend(AdaClipConfig(checkpoint=str(tmp_path / "ck.pt"), class_name=" "), backbone=tiny56)
    with pytest.raises(ValueError, match="depth"):
        AdaClipBackend(AdaClipConfig(checkpoint=str(tmp_path / "ck.pt"), class_name="a", prompt_depth=3),
                       backbone=tiny56)
    with pytest.raises(ValueError, match="cls_input 'nope'"):
        AdaClipBackend(AdaClipConfig(checkpoint=str(tmp_path / "ck.pt"), class_name="a", cls_input="nope"),
                       backbone=tiny56)
    with pytest.raises(ValueError, match="backbone"):
        AdaClipBackend(AdaClipConfig(checkpoint=str(tmp_path / "ck.pt"), class_name="a"), backbone=None)
    for key, match in (("pos_embed", "pos_embed 'nope'"), ("prompt_precision", "prompt_precision 'nope'")):
        with pytest.raises(ValueError, match=match):
            AdaClipBackend(AdaClipConfig(checkpoint=str(tmp_path / "ck.pt"), class_name="a", **{key: "nope"}),
                           backbone=tiny56)
