"""VCP-CLIP: Post-VCP, Pre-VCP, text encoder, maps and scores against float64 loops; checkpoints; training;
the backend end to end on a tiny-CLIP feature cache."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from anorefiner.cache import extract_features, read_features
from anorefiner.data.index import index_category
from anorefiner.zsad.april_gan.train import training_samples
from anorefiner.zsad.checkpoints import OFFICIAL
from anorefiner.zsad.vcp_clip.backend import (PostVcp, VcpClipBackend, VcpClipConfig, VcpDims,
                                      VcpModel, branch_maps, class_minmax, effective_topk, image_scores,
                                      load_vcp_checkpoint, smooth)
from anorefiner.zsad.vcp_clip.prompts import (ABNORMAL_PROMPT, NORMAL_PROMPT, PreVcp, slot_tokens, token_embeddings,
                                              vcp_text)
from anorefiner.zsad.vcp_clip.train import (TrainConfig, augment, check_checkpoint, draw_augmentation,
                                            mosaic_pick_anomalous, train_backend, train_vcp)


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_post_vcp_attention_matches_the_float64_loop():
    g = torch.Generator().manual_seed(0)
    b, s, n, d, c, heads = 2, 2, 5, 6, 8, 4
    post = PostVcp(d, c, heads).double()
    text = torch.randn(b, s, d, generator=g, dtype=torch.float64)
    fs = torch.nn.functional.normalize(torch.randn(b, n, c, generator=g, dtype=torch.float64), dim=-1)
    got = post(text, fs).detach().numpy()
    wq, bq = post.q_proj_pre.weight[:, :, 0].detach().numpy(), post.q_proj_pre.bias.detach().numpy()
    wk, bk = post.k_proj_pre_1.weight[:, :, 0].detach().numpy(), post.k_proj_pre_1.bias.detach().numpy()
    wv, bv = post.v_proj_pre_1.weight[:, :, 0].detach().numpy(), post.v_proj_pre_1.bias.detach().numpy()
    wo, bo = post.proj_post_t.weight[:, :, 0].detach().numpy(), post.proj_post_t.bias.detach().numpy()
    hd = c // heads
    for bi in range(b):
        k = [wk @ fs[bi, m].numpy() + bk for m in range(n)]
        v = [wv @ fs[bi, m].numpy() + bv for m in range(n)]
        for si in range(s):
            q = wq @ text[bi, si].numpy() + bq
            out = np.zeros(c)
            for h in range(heads):
                sl = slice(h * hd, (h + 1) * hd)
                w = _softmax(np.array([(q[sl] * k[m][sl]).sum() for m in range(n)]))  # no 1/sqrt(d)
                out[sl] = sum(w[m] * v[m][sl] for m in range(n))
            o = wo @ out + bo
            np.testing.assert_allclose(got[bi, si], o / np.linalg.norm(o), rtol=1e-9, atol=1e-10)


def test_branch_logits_and_maps_match_the_float64_loop():
    g = torch.Generator().manual_seed(1)
    dims = VcpDims(width=8, embed=4, text_width=4, n_layers=2, text_blocks=2)
    torch.manual_seed(0)
    m = VcpModel(dims, heads=2).double().requires_grad_(False)
    h = w = 3
    toks = [torch.randn(2, h * w, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    text = torch.nn.functional.normalize(torch.randn(2, 2, 4, generator=g, dtype=torch.float64), dim=-1)
    raw, new = m.layer_logits(toks, text, (h, w))
    t1, t2 = math.exp(float(m.pre.prompt_temp.detach())), math.exp(float(m.post.prompt_temp_l1.detach()))
    for li, t in enumerate(toks):
        fc = m.linear.fc[li]
        post = m.post(text, torch.nn.functional.normalize(t, dim=-1)).detach().numpy()
        for bi in range(2):
            for k in range(h * w):
                p = fc.weight.detach().numpy() @ t[bi, k].numpy() + fc.bias.detach().numpy()
                p /= np.linalg.norm(p)
                fs = t[bi, k].numpy() / np.linalg.norm(t[bi, k].numpy())
                for c in range(2):
                    assert float(raw[li][bi, c, k // w, k % w]) == pytest.approx(t1 * p @ text[bi, c].numpy(), rel=1e-9)
                    assert float(new[li][bi, c, k // w, k % w]) == pytest.approx(t2 * fs @ post[bi, c], rel=1e-9)
    rmap, nmap = branch_maps(raw, new, 7)
    ref = np.mean([torch.softmax(torch.nn.functional.interpolate(lg, size=(7, 7), mode="bilinear",
                                                                 align_corners=True), 1)[:, 1].detach().numpy()
                   for lg in raw], axis=0)
    np.testing.assert_allclose(rmap.detach().numpy(), ref, rtol=1e-9)
    assert nmap.shape == (2, 7, 7)


def test_pre_vcp_matches_the_float64_loop():
    g = torch.Generator().manual_seed(2)
    pre = PreVcp(6, r=2).double()
    glob = torch.randn(3, 6, generator=g, dtype=torch.float64)
    got = pre(glob).detach().numpy()
    wt, bs, q = pre.prompt_linear1.fc.weight.detach().numpy(), pre.prompt_linear1.fc.bias.detach().numpy(), \
        pre.prompt_query.detach().numpy()
    for b in range(3):
        x = np.concatenate([[0.0], glob[b].numpy(), [0.0]])  # padding 'same' with kernel 3
        for r in range(2):
            for j in range(6):
                ref = sum(wt[r, 0, k] * x[j + k] for k in range(3)) + bs[r] + q[0, r, j]
                assert got[b, r, j] == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert float(pre.prompt_temp.detach()) == pytest.approx(math.log(1 / 0.07))


def _gauss_loop(img: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    rad = int(truncate * sigma + 0.5)
    wts = np.exp(-0.5 * (np.arange(-rad, rad + 1) / sigma) ** 2)
    wts /= wts.sum()
    n = img.shape[0]

    def refl(i):  # scipy 'reflect': (d c b a | a b c d | d c b a)
        while i < 0 or i >= n:
            i = -i - 1 if i < 0 else 2 * n - i - 1
        return i

    out = np.zeros_like(img)
    for y in range(n):
        for x in range(n):
            out[y, x] = sum(wts[a + rad] * wts[b + rad] * img[refl(y + a), refl(x + b)]
                            for a in range(-rad, rad + 1) for b in range(-rad, rad + 1))
    return out


def test_final_map_and_image_score_match_the_float64_loop():
    rng = np.random.default_rng(3)
    raw, new = rng.random((3, 9, 9)), rng.random((3, 9, 9))
    sm = smooth(raw, new, 0.2, 1.5)
    ref = np.stack([_gauss_loop(0.2 * raw[i] + 0.8 * new[i], 1.5) for i in range(3)])
    np.testing.assert_allclose(sm, ref, rtol=1e-9, atol=1e-12)
    final = class_minmax(sm, sm.min(), sm.max())
    lo, hi = ref.min(), ref.max()  # over the whole class stack, not per image
    np.testing.assert_allclose(final, (ref - lo) / (hi - lo), rtol=1e-9, atol=1e-12)
    k = effective_topk(2000, 81, 518)
    assert k == 1 and effective_topk(2000, 518 * 518) == 2000 and effective_topk(2000, 100 * 100) == 75
    k = 5
    got = image_scores(torch.from_numpy(raw), torch.from_numpy(new), k).numpy()
    for i in range(3):
        assert got[i] == pytest.approx(np.sort(raw[i].ravel())[-k:].mean() + np.sort(new[i].ravel())[-k:].mean(),
                                       rel=1e-12)
    assert (class_minmax(np.ones((2, 3, 3)), 1.0, 1.0) == 0).all()  # constant stack: zeros, not NaN


def test_class_slot_and_plain_text_encoder_equal_clip(tiny56):
    tok = slot_tokens(tiny56, [[NORMAL_PROMPT], [ABNORMAL_PROMPT]])
    plain = tiny56._tokenizer(["a photo of a good object", "a photo of a damaged object"])
    word = tiny56._tokenizer(["object"])[0, 1]
    emb = token_embeddings(tiny56, torch.full((1, 1), int(word)))[:, :1]  # [1, r=1, W]
    got = vcp_text(tiny56, tok, emb, None)  # no deep prompts: CLIP's text forward on the spliced sequence
    ref = tiny56.encode_text(["a photo of a good object", "a photo of a damaged object"], normalize=True)
    torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-5)
    assert (tok.ids[:, : int(tok.slot[0])] == plain[:, : int(tok.slot[0])]).all()
    with pytest.raises(ValueError, match="exactly once"):
        slot_tokens(tiny56, [["a photo of a good thing"]])


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def test_prompted_text_encoder_matches_a_float64_loop(tiny56):
    torch.manual_seed(4)
    dims = VcpDims.of_backbone(tiny56)
    m = VcpModel(dims).eval()
    tok = slot_tokens(tiny56, [[NORMAL_PROMPT], [ABNORMAL_PROMPT]])
    glob = torch.randn(2, dims.embed)
    got = m.text(tiny56, tok, glob).detach().double().numpy()
    clip = copy.deepcopy(tiny56.model).double()
    pr = {k: v.detach().double().numpy() for k, v in m.prompts.state_dict().items()}
    cf = m.pre.double()(glob.double()).detach().numpy()
    emb = clip.token_embedding.weight.detach().numpy()
    pos = clip.positional_embedding.detach().numpy()
    r, n_ctx = cf.shape[1], tok.ids.shape[1]
    proj = lambda p: pr["prompt_proj.weight"] @ p + pr["prompt_proj.bias"]  # noqa: E731
    for b in range(2):
        for s in range(2):
            ids, slot = tok.ids[s].tolist(), int(tok.slot[s])
            seq = [emb[i] for i in ids[:slot]] + list(cf[b]) + [emb[i] for i in ids[slot + 1 :]]
            x = np.stack(seq[:n_ctx]) + pos
            x = np.concatenate([x[:1], [proj(pr["prompt_embeddings"][0, 0])], x[1:-1]])
            for i, block in enumerate(clip.transformer.resblocks):
                if i > 0:
                    x[1] = proj(pr["deep_prompt_embeddings"][i - 1, 0])
                x = block(torch.from_numpy(x)[None], attn_mask=clip.attn_mask.double()).detach().numpy()[0]
            x = np.concatenate([x[:1], x[2:]])
            x = _layer_norm(x, pr["prompt_norm.weight"], pr["prompt_norm.bias"], 1e-6)
            x = _layer_norm(x, clip.ln_final.weight.detach().numpy(), clip.ln_final.bias.detach().numpy(), 1e-5)
            e = x[int(tok.eot[s]) + r - 1] @ clip.text_projection.detach().numpy()
            np.testing.assert_allclose(got[b, s], e / np.linalg.norm(e), rtol=1e-5, atol=1e-5)


def _model_file(tiny56, path, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = VcpModel(VcpDims.of_backbone(tiny56))
    torch.save(m.state_official(), path)
    return path, m


def test_checkpoint_round_trip_and_errors(tiny56, tmp_path):
    path, m = _model_file(tiny56, tmp_path / "ok.pth")
    loaded = load_vcp_checkpoint(path, tiny56)
    for (k, v), (k2, v2) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    check_checkpoint(path)  # dimensions from the file itself
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"trainable_linearlayer", "New_Lan_Embed", "Zero_try", "prompt_embeddings",
                        "deep_prompt_embeddings", "prompt_proj.weight", "prompt_proj.bias", "prompt_norm.weight",
                        "prompt_norm.bias", "prompt_text_projection"}
    assert sorted(obj["New_Lan_Embed"]) == ["prompt_linear1.fc.bias", "prompt_linear1.fc.weight", "prompt_query",
                                            "prompt_temp"]
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        check_checkpoint(tmp_path / "missing.pth")
    bad = dict(obj, Zero_try={**obj["Zero_try"], "q_proj_pre.weight": torch.zeros(64, 31, 1)})
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape.pth: Zero_try.q_proj_pre.weight has shape \(64, 31, 1\)"):
        check_checkpoint(tmp_path / "shape.pth", tiny56)
    bad = {k: v for k, v in obj.items() if k != "prompt_norm.bias"}
    torch.save(bad, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match="keys.pth: 'prompt_norm.bias' is None"):
        check_checkpoint(tmp_path / "keys.pth", tiny56)
    bad = dict(obj, trainable_linearlayer={**obj["trainable_linearlayer"], "fc.9.bias": torch.zeros(32)})
    torch.save(bad, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"extra.pth: 'trainable_linearlayer' has unexpected keys \['fc.9.bias'\]"):
        check_checkpoint(tmp_path / "extra.pth", tiny56)
    torch.save({"trainable_linearlayer": obj["trainable_linearlayer"]}, tmp_path / "apg.pth")
    with pytest.raises(ValueError, match="apg.pth: no 'New_Lan_Embed'"):
        check_checkpoint(tmp_path / "apg.pth")
    torch.save({**obj, "meta": {"heads": 4}}, tmp_path / "heads.pth")
    with pytest.raises(ValueError, match="heads.pth: trained with 4 Post-VCP heads, option heads is 8"):
        check_checkpoint(tmp_path / "heads.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth: not a weights-only"):
        check_checkpoint(tmp_path / "junk.pth")
    assert set(OFFICIAL["vcp_clip"]) == {"visa", "mvtec_ad"}


def test_augmentation_keeps_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    img = np.zeros((20, 20, 3), np.uint8)
    img[2:6, 10:16] = 255
    mask = np.zeros((20, 20), np.uint8)
    mask[2:6, 10:16] = 255
    a = {"rot90": 1, "rotate": 0.0}
    out, m = augment(img, mask, a)
    assert ((out[..., 0] > 127) == (m > 127)).all()
    c = TrainConfig()
    for _ in range(20):
        out, m = augment(img, mask, draw_augmentation(rng, c))
        assert out.shape == (20, 20, 3) and out.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}


def test_mosaic_uses_anomalous_images_only(demo_dataset):
    rows = [r for r in training_samples(demo_dataset, "demo") if r["category"] == "tiles"]
    picks = mosaic_pick_anomalous(rows, np.random.default_rng(0))
    assert len(picks) == 4 and all(r["mask"] is not None for r in picks)
    assert mosaic_pick_anomalous([r for r in rows if r["mask"] is None], np.random.default_rng(0)) == []


def test_unknown_option_is_named():
    from anorefiner.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="temprature"):
        from_dict(VcpClipConfig, {"temprature": 1}, "backends.vcp_clip.options")
    with pytest.raises(ConfigError, match="epoch"):
        from_dict(TrainConfig, {"epoch": 1})


def test_one_epoch_training_is_finite_and_deterministic(tiny56, demo_dataset, tmp_path):
    rows = training_samples(demo_dataset, "demo", max_images=3)
    cfg = TrainConfig(epochs=1, batch_size=3, mosaic_p=0.5, seed=5, workers=2)
    out = train_vcp(tiny56, rows, cfg, tmp_path / "a" / "vcp.pth")
    obj = torch.load(out, weights_only=True)
    assert len(obj["meta"]["epoch_losses"]) == 1 and np.isfinite(obj["meta"]["epoch_losses"]).all()
    load_vcp_checkpoint(out, tiny56)
    train_vcp(tiny56, rows, TrainConfig(epochs=1, batch_size=3, mosaic_p=0.5, seed=5, workers=1),
              tmp_path / "b.pth")
    again = torch.load(tmp_path / "b.pth", weights_only=True)
    torch.testing.assert_close(again["Zero_try"], obj["Zero_try"], rtol=0, atol=0)
    torch.testing.assert_close(again["deep_prompt_embeddings"], obj["deep_prompt_embeddings"], rtol=0, atol=0)
    init = VcpModel(VcpDims.of_backbone(tiny56)).state_official()
    assert not torch.equal(init["prompt_embeddings"], obj["prompt_embeddings"])  # something was trained
    with pytest.raises(ValueError, match="no training images"):
        train_vcp(tiny56, [], cfg, tmp_path / "c.pth")
    # The trainer interface of the registry: the auxiliary dataset's test split under root.
    out = train_backend(tiny56, demo_dataset, "demo", TrainConfig(epochs=1, batch_size=4, max_images=2),
                        tmp_path / "d.pth")
    check_checkpoint(out, tiny56)
    assert torch.load(out, weights_only=True)["meta"]["auxiliary_dataset"] == "demo"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train_backend(tiny56, tmp_path / "nowhere", "visa", cfg, tmp_path / "e.pth")


def test_backend_end_to_end_on_a_feature_cache(tiny56, demo_dataset, tmp_path):
    index = index_category(demo_dataset, "widget", dataset="demo")
    feats = read_features(extract_features(index, tiny56, tmp_path / "widget.h5", batch_size=6))
    ck, _ = _model_file(tiny56, tmp_path / "vcp.pth", seed=1)
    backend = VcpClipBackend(VcpClipConfig(checkpoint=str(ck), batch_size=5), backbone=tiny56)
    result = backend.coarse(feats)
    n = len(feats.ids)
    assert result.maps.shape == (n, 4, 4) and result.scores.shape == (n,)
    assert np.isfinite(result.maps).all() and result.maps.min() >= 0 and result.maps.max() <= 1
    assert ((result.scores > 0) & (result.scores < 2)).all()
    # The stored maps are the area means of the official full-size maps (class min-max over the whole stack).
    with torch.no_grad():
        names = list(tiny56.layers)
        toks = [torch.as_tensor(feats.layers[k]).float().reshape(n, 16, -1) for k in names]
        g = tiny56.image_embedding(torch.as_tensor(np.asarray(feats.cls)), normalize=False)
        text = backend.model.text(tiny56, backend.tokens, g)
        rmap, nmap = branch_maps(*backend.model.layer_logits(toks, text, (4, 4)), 56)
    full = smooth(rmap.numpy(), nmap.numpy(), 0.2, 8.0)
    full = (full - full.min()) / (full.max() - full.min())
    np.testing.assert_allclose(result.maps, full.reshape(n, 4, 14, 4, 14).mean(axis=(2, 4)), rtol=1e-4, atol=1e-5)
    k = effective_topk(2000, 56 * 56)
    np.testing.assert_allclose(result.scores, image_scores(rmap, nmap, k).numpy(), rtol=1e-5)
    assert backend.last_info["class_minmax"] and backend.last_info["topk"] == effective_topk(2000, 56 * 56)
    # PGT queries: the same tokens and class tokens give the coarse maps (category min / max), also cold.
    q = {k: torch.as_tensor(v[:2]) for k, v in feats.layers.items()}
    qcls = torch.as_tensor(np.asarray(feats.cls)[:2])
    torch.testing.assert_close(backend.score_queries(q, qcls, feats, [0, 1], [None, None]),
                               torch.as_tensor(result.maps[:2]), rtol=1e-5, atol=1e-6)
    cold = VcpClipBackend(VcpClipConfig(checkpoint=str(ck)), backbone=tiny56)
    torch.testing.assert_close(cold.score_queries(q, qcls, feats, [0], [None, None]),
                               torch.as_tensor(result.maps[:2]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no class token"):
        backend.score_queries(q, None, feats, [0], [None, None])
    lo, hi = backend.last_info["stack_min"], backend.last_info["stack_max"]
    # The stack min-max makes a map depend on the category: one image alone is min-maxed on itself.
    one = copy.copy(feats)
    one.layers, one.cls, one.ids = ({k: v[:1] for k, v in feats.layers.items()}, np.asarray(feats.cls)[:1],
                                    feats.ids[:1])
    single = backend.coarse(one)
    assert single.maps.shape == (1, 4, 4) and single.maps.min() >= 0 and single.maps.max() <= 1
    assert single.scores[0] == pytest.approx(result.scores[0], rel=1e-5)
    raw_backend = VcpClipBackend(VcpClipConfig(checkpoint=str(ck), class_minmax=False), backbone=tiny56)
    np.testing.assert_allclose(raw_backend.coarse(one).maps, result.maps[:1] * (hi - lo) + lo, rtol=1e-4)
    empty = copy.copy(feats)
    empty.layers, empty.cls, empty.ids = ({k: v[:0] for k, v in feats.layers.items()}, np.asarray(feats.cls)[:0],
                                          feats.ids[:0])
    with pytest.raises(ValueError, match="empty category"):
        backend.coarse(empty)
    with pytest.raises(ValueError, match="needs option 'checkpoint'"):
        VcpClipBackend(VcpClipConfig(), backbone=tiny56)
