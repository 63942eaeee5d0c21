"""Bayes-PFL: prompt flows, KL, RCA, fuse, losses, the prompted text, maps and scores against float64 loops;
checkpoints; both training stages; the backend end to end on a tiny-CLIP feature cache."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from anorefiner.backbones import build_backbone
from anorefiner.cache import extract_features, read_features
from anorefiner.data.index import index_category
from anorefiner.zsad.aa_clip.model import dims_of
from anorefiner.zsad.april_gan.train import training_samples
from anorefiner.zsad.bayes_pfl.backend import (CHECKPOINT_KEY, BayesPflBackend, BayesPflConfig, class_scores,
                                               full_map, load_model, pair_probs, topk_means)
from anorefiner.zsad.bayes_pfl.model import (RCA, BayesPfl, GlobalFeature, dice_loss, focal_loss, kl_term,
                                             orthogonal_loss, planar_flows)
from anorefiner.zsad.bayes_pfl.prompts import class_sentence, class_tokens, prompted_text
from anorefiner.zsad.bayes_pfl.train import (TrainConfig, cosine_warmup, stage1_groups, stage2_params,
                                             train_backend, train_bayes_pfl)

from ..reference import bilinear_align_corners


def _model(bb, seed=0, **kw) -> BayesPfl:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BayesPfl(*dims_of(bb), len(bb.layers), **kw)


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_planar_flows_and_log_det_match_the_float64_loop():
    g = torch.Generator().manual_seed(0)
    n, k, d = 3, 4, 5
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    u, w = torch.randn(n, k, d, 1, generator=g, dtype=torch.float64), torch.randn(n, k, 1, d, generator=g,
                                                                                  dtype=torch.float64)
    b = torch.randn(n, k, 1, 1, generator=g, dtype=torch.float64)
    got_z, got_ld = planar_flows(z, u, w, b)
    for i in range(n):
        zi, ld = z[i].numpy().copy(), 0.0
        for j in range(k):
            uj, wj, bj = u[i, j, :, 0].numpy(), w[i, j, 0].numpy(), float(b[i, j])
            t = math.tanh(float(wj @ zi) + bj)
            ld += math.log(abs(1 + float((wj * (1 - t * t)) @ uj)) + 1e-5)
            zi = zi + uj * t
        np.testing.assert_allclose(got_z[i].numpy(), zi, rtol=1e-12, atol=1e-12)
        assert float(got_ld[i]) == pytest.approx(ld, rel=1e-12)


def _log_normal_loop(x, mean, logvar):
    return sum(-0.5 * (logvar[j] + (x[j] - mean[j]) ** 2 / math.exp(logvar[j])) for j in range(len(x)))


def test_kl_terms_follow_the_official_broadcasting():
    g = torch.Generator().manual_seed(1)
    batch, d = 4, 3
    for n in (batch, 1):  # the image-specific flow (one row per image) and a state flow (one row, broadcast)
        mu = torch.randn(n, d, generator=g, dtype=torch.float64)
        var = torch.rand(n, d, generator=g, dtype=torch.float64) + 0.5
        z0, zk = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g,
                                                                                  dtype=torch.float64)
        ld = torch.randn(n, generator=g, dtype=torch.float64)
        # loss.py binary_loss_function(summ=True): log p(zk) against a [batch, d] zero log-variance
        log_p = [_log_normal_loop(zk[min(r, n - 1)].numpy(), np.zeros(d), np.zeros(d)) for r in range(batch)]
        log_q = [_log_normal_loop(z0[r].numpy(), mu[r].numpy(), np.log(var[r].numpy())) for r in range(n)]
        rows = [log_q[min(r, n - 1)] - log_p[r] for r in range(batch)]
        ref = (sum(rows) - float(ld.sum())) / batch
        assert float(kl_term(mu, var, z0, zk, ld, batch)) == pytest.approx(ref, rel=1e-12)


def test_rca_and_fuse_match_the_float64_loop():
    g = torch.Generator().manual_seed(2)
    b, s, n, wv, wt, heads = 2, 3, 5, 6, 8, 4
    rca = RCA(wv, wt, 2, heads).double()
    text = torch.randn(b, s, wt, generator=g, dtype=torch.float64)
    tok = torch.randn(b, n, wv, generator=g, dtype=torch.float64)
    got_t, got_f = rca(text, tok, 1)
    wl = rca.linear_proj[1].weight.detach().numpy()
    wq, bq = rca.q_proj_pre.weight[:, :, 0].detach().numpy(), rca.q_proj_pre.bias.detach().numpy()
    hd = wt // heads
    for i in range(b):
        fs = [wl @ tok[i, m].numpy() for m in range(n)]
        fs = [f / np.linalg.norm(f) for f in fs]
        np.testing.assert_allclose(got_f[i].detach().numpy(), np.stack(fs), rtol=1e-12)
        for r in range(s):
            q, out = wq @ text[i, r].numpy() + bq, np.zeros(wt)
            for h in range(heads):
                sl = slice(h * hd, (h + 1) * hd)
                a = _softmax(np.array([(q[sl] * fs[m][sl]).sum() / math.sqrt(wt) for m in range(n)]))  # full width
                out[sl] = sum(a[m] * fs[m][sl] for m in range(n))
            out = out + text[i, r].numpy()
            np.testing.assert_allclose(got_t[i, r].detach().numpy(), out / np.linalg.norm(out), rtol=1e-10)
    fuse = GlobalFeature(wv, wt, 2).double()
    toks = [torch.randn(b, n, wv, generator=g, dtype=torch.float64) for _ in range(2)]
    got = fuse(toks).detach().numpy()
    w1, b1 = fuse.fuse_modules.weight.detach().numpy(), fuse.fuse_modules.bias.detach().numpy()
    wc, bc = fuse.compress.weight.detach().numpy()[0], float(fuse.compress.bias.detach())
    w2, b2 = fuse.post_process.weight.detach().numpy(), fuse.post_process.bias.detach().numpy()
    for i in range(b):
        x = [w1 @ np.concatenate([t[i, m].numpy() for t in toks]) + b1 for m in range(n)]
        a = _softmax(np.array([wc @ xm + bc for xm in x]))
        np.testing.assert_allclose(got[i], w2 @ sum(a[m] * x[m] for m in range(n)) + b2, rtol=1e-10)


def test_losses_match_the_float64_loop():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64)
    probs = torch.softmax(logits, dim=1)
    gt = (torch.rand(2, 4, 4, generator=g) > 0.7).double()
    fg, bg, nfg, nbg, inter, psum = 0.0, 0.0, 0, 0, 0.0, 0.0
    for idx in np.ndindex(2, 4, 4):
        t = int(gt[idx])
        pt = float(probs[idx[0], t, idx[1], idx[2]])
        loss = -((1 - pt) ** 2) * math.log(pt + 1e-8)
        fg, nfg = (fg + loss, nfg + 1) if t else (fg, nfg)
        bg, nbg = (bg, nbg) if t else (bg + loss, nbg + 1)
        p1 = float(probs[idx[0], 1, idx[1], idx[2]])
        inter, psum = inter + p1 * t, psum + p1
    assert float(focal_loss(probs, gt)) == pytest.approx(fg / (nfg + 1e-8) + bg / (nbg + 1e-8), rel=1e-10)
    assert float(dice_loss(probs, gt)) == pytest.approx(1 - (2 * inter + 1e-5) / (psum + nfg + 1e-5), rel=1e-10)
    text = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    ref = 0.0
    for part in (slice(0, 3), slice(3, 6)):
        e = text[:, part].numpy()
        e = e / np.linalg.norm(e, axis=-1, keepdims=True)
        ref += sum((e[i, a] @ e[i, c]) ** 2 for i in range(2) for a in range(3) for c in range(3) if a != c) / 18
    assert float(orthogonal_loss(text, 3)) == pytest.approx(ref, rel=1e-10)


def test_prompted_text_matches_the_loop(tiny56):
    assert class_sentence("pcb3") == "X printed circuit board" and class_sentence("metal_nut") == "X metal nut"
    assert class_sentence("widget") == "X widget" and class_sentence("Bottle") == "X bottle"
    with pytest.raises(ValueError, match="empty class name"):
        class_sentence("")
    bb = copy.copy(tiny56)
    bb.model = copy.deepcopy(tiny56.model).double()
    g = torch.Generator().manual_seed(4)
    tokens = class_tokens(bb, ["pcb1", "widget"])
    bank = torch.randn(2, 4, 32, generator=g, dtype=torch.float64)  # 2 prompts, P = 3 context + Q = 1 state
    ctx, state = torch.randn(2, 32, generator=g, dtype=torch.float64), torch.randn(2, 32, generator=g,
                                                                                   dtype=torch.float64)
    got = prompted_text(bb, tokens, bank, ctx, state, 3).detach().numpy()
    model = bb.model
    emb = model.token_embedding.weight.detach().numpy()
    for r in range(2):
        ids = tokens[r].tolist()
        for p in range(2):
            seq = [emb[ids[0]]] + [bank[p, j].numpy() + (ctx[r] if j < 3 else state[r]).numpy() for j in range(4)]
            seq += [emb[i] for i in ids[2:]]  # "X" (position 1) is replaced by the 4 prompt vectors
            x = torch.from_numpy(np.stack(seq[:77]))[None] + model.positional_embedding
            for block in model.transformer.resblocks:
                x = block(x, attn_mask=model.attn_mask.double())
            x = model.ln_final(x)[0]
            eot = ids.index(max(ids)) + 4 - 1
            np.testing.assert_allclose(got[r, p], (x[eot] @ model.text_projection).detach().numpy(), rtol=1e-9,
                                       atol=1e-10)


def test_maps_and_scores_match_the_float64_loop(tiny56):
    model = _model(tiny56, seed=5).double()
    g = torch.Generator().manual_seed(6)
    b, h, s, size = 2, 4, 2, 9  # s pairs: the text holds 2s rows (normal first)
    text = torch.nn.functional.normalize(torch.randn(b, 2 * s, 32, generator=g, dtype=torch.float64), dim=-1)
    toks = [torch.randn(b, h * h, 64, generator=g, dtype=torch.float64) for _ in range(4)]
    got = full_map(model, text, toks, (h, h), size).detach().numpy()
    ref = np.zeros((b, size, size))
    for layer, tok in enumerate(toks):
        lg = model.pixel_logits(text, tok, layer, (h, h)).detach().numpy()  # RCA: tested above
        for i in range(b):
            for pair in range(s):
                up = [bilinear_align_corners(lg[i, c], size) for c in (pair, pair + s)]
                ref[i] += np.exp(up[1]) / (np.exp(up[0]) + np.exp(up[1])) / (4 * s)  # softmax of the pair, abnormal
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    lg = torch.randn(3, 2 * s, generator=g, dtype=torch.float64)
    probs = pair_probs(lg).numpy()
    for i in range(3):
        for pair in range(s):
            assert probs[i, pair] == pytest.approx(_softmax(lg[i, [pair, pair + s]].numpy())[1], rel=1e-12)
    top = topk_means(torch.from_numpy(ref), 5).numpy()
    np.testing.assert_allclose(top, [np.sort(m.ravel())[-5:].mean() for m in ref], rtol=1e-12)
    p, t = np.array([0.2, 0.9, 0.5]), np.array([3.0, 1.0, 2.0])
    want = 0.5 * (p - 0.2) / (0.7 + 1e-8) + 0.5 * (t - 1.0) / (2.0 + 1e-8)
    np.testing.assert_allclose(class_scores(p, t, 0.5), want, rtol=1e-12)
    logits = model.image_logits(text, toks[0][:, 0, :32].contiguous()).detach().numpy()  # stage 1: L2(g)
    assert float(model.temperature_image.detach()) == pytest.approx(math.log(1 / 0.07))
    cm_w, cm_b = model.class_mapping.weight.detach().numpy(), model.class_mapping.bias.detach().numpy()
    gl, tau = toks[0][:, 0, :32].numpy(), float(model.temperature_image.detach().exp())
    for i in range(b):
        for r in range(2 * s):
            t_ = cm_w @ text[i, r].numpy() + cm_b
            want = tau * (t_ / np.linalg.norm(t_)) @ (gl[i] / np.linalg.norm(gl[i]))
            assert logits[i, r] == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------- checkpoints and training
def test_checkpoint_round_trip_and_errors(tiny56, tmp_path):
    m = _model(tiny56, seed=7)
    names = set(m.state_dict())
    assert {"prompt_context", "PFL_context.amor_u.weight", "PFL_normal.state", "PFL_abnormal.amor_w",
            "PFL_normal.encoder.weight_mean.module.0.weight", "state_encoder.weight_mean.module.0.weight",
            "RCA.q_proj_pre.weight", "RCA.linear_proj.3.weight", "fuse.fuse_modules.weight",
            "class_mapping.weight", "image_mapping.bias", "temperature_pixel"} <= names
    assert m.PFL_normal.encoder is m.PFL_abnormal.encoder is m.state_encoder  # the official sharing
    torch.save({CHECKPOINT_KEY: m.state_dict()}, tmp_path / "ok.pt")
    loaded, meta = load_model(tmp_path / "ok.pt", tiny56)
    assert meta == {}
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    state = m.state_dict()
    state["class_mapping.weight"] = torch.zeros(32, 16)
    torch.save({CHECKPOINT_KEY: state}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"shape.pt: class_mapping.weight has shape \(16, 32\)|shape.pt: class_map"):
        load_model(tmp_path / "shape.pt", tiny56)
    torch.save({"state_dict": m.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: no 'MyModel' state dict"):
        load_model(tmp_path / "other.pt")
    small = _model(tiny56, prompt_num=2, num_flows=3)
    torch.save({CHECKPOINT_KEY: small.state_dict()}, tmp_path / "small.pt")
    got, _ = load_model(tmp_path / "small.pt", tiny56)  # sizes read from the shapes
    assert got.prompt_num == 2 and got.PFL_normal.num_flows == 3
    with pytest.raises(ValueError, match="the backbone has"):
        load_model(tmp_path / "ok.pt", build_backbone(tiny56.name, 56, layers=[2, 4], pretrained=None, seed=0))


def test_schedule_and_optimiser_groups(tiny56):
    assert [cosine_warmup(s, 10, 100) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert cosine_warmup(55, 10, 100) == pytest.approx(0.5) and cosine_warmup(100, 10, 100) == pytest.approx(0.0)
    m = _model(tiny56)
    names = {id(p): n for n, p in m.named_parameters()}
    groups = [[names[id(p)] for p in grp["params"]] for grp in stage1_groups(m, TrainConfig())]
    assert groups[0] == ["prompt_context", "prompt_state_normal", "prompt_state_abnormal"]
    assert groups[1] == ["temperature_pixel", "temperature_image"]
    assert "PFL_normal.state" in groups[2] and "PFL_context.amor_u.weight" in groups[2]
    assert not any("encoder" in n or "decoder" in n for n in groups[2])
    assert "context_encoder.weight_mean.module.0.weight" in groups[3] and "RCA.q_proj_pre.weight" in groups[3]
    assert sum(map(len, groups)) == len(names)
    assert {names[id(p)].split(".")[0] for p in stage2_params(m)} == {"fuse", "class_mapping", "image_mapping"}


def test_both_stages_train_and_stage_two_moves_only_the_classifier(tiny56, demo_dataset, tmp_path):
    rows = training_samples(demo_dataset, "demo", max_images=3)
    kw = {"batch_size": 4, "seed": 9, "workers": 2, "mosaic_p": 0.5, "schedule_epochs": 2}
    a, b = (torch.load(train_bayes_pfl(tiny56, rows, TrainConfig(stage1_epochs=1, stage2_epochs=n, **kw),
                                       tmp_path / f"{n}.pt"), weights_only=True) for n in (0, 1))
    assert a["meta"]["stage"] == 1 and b["meta"]["stage"] == 2 and b["meta"]["epoch_stages"] == [1, 2]
    assert np.isfinite(b["meta"]["epoch_losses"]).all()
    init = _model(tiny56, seed=9).state_dict()
    for k, v in b[CHECKPOINT_KEY].items():
        moved_in_2 = not torch.equal(v, a[CHECKPOINT_KEY][k])
        assert moved_in_2 == (k.split(".")[0] in ("fuse", "class_mapping", "image_mapping")), k
    assert not torch.equal(a[CHECKPOINT_KEY]["prompt_context"], init["prompt_context"])  # stage 1 trained it
    again = train_backend(tiny56, demo_dataset, "demo", TrainConfig(stage1_epochs=1, stage2_epochs=1, max_images=3,
                                                                    **{**kw, "workers": 1}), tmp_path / "c.pt")
    for k, v in torch.load(again, weights_only=True)[CHECKPOINT_KEY].items():
        assert torch.equal(v, b[CHECKPOINT_KEY][k]), k
    assert TrainConfig().epochs == 30
    with pytest.raises(ValueError, match="no training images"):
        train_bayes_pfl(tiny56, [], TrainConfig(), tmp_path / "x.pt")
    with pytest.raises(ValueError, match="mosaic_p"):
        train_bayes_pfl(tiny56, rows, TrainConfig(mosaic_p=2.0), tmp_path / "x.pt")


def test_backend_end_to_end_on_a_feature_cache(tiny56, demo_dataset, tmp_path):
    idx = index_category(demo_dataset, "widget", dataset="demo").head(6)
    extract_features(idx, tiny56, tmp_path / "f.h5", batch_size=6)
    feats = read_features(tmp_path / "f.h5")
    torch.save({CHECKPOINT_KEY: _model(tiny56, seed=10).state_dict()}, tmp_path / "m.pt")
    opts = dict(checkpoint=str(tmp_path / "m.pt"), class_name="widget", sample_num=3, batch_size=4, sigma=1.0)
    backend = BayesPflBackend(BayesPflConfig(**opts), backbone=tiny56, seed=0)
    result = backend.coarse(feats)
    assert result.maps.shape == (6, 4, 4) and np.isfinite(result.scores).all()
    assert result.scores.min() >= 0 and result.scores.max() <= 1 and backend.last_info["stage"] == 2
    assert backend.topk == 23  # 2000 pixels at 518^2, scaled to 56^2
    same = BayesPflBackend(BayesPflConfig(**{**opts, "batch_size": 1}), backbone=tiny56, seed=0).coarse(feats)
    np.testing.assert_allclose(same.maps, result.maps, rtol=1e-5, atol=1e-6)  # per-image streams: batching-free
    np.testing.assert_allclose(same.scores, result.scores, rtol=1e-5, atol=1e-5)
    other = BayesPflBackend(BayesPflConfig(**opts), backbone=tiny56, seed=1).coarse(feats)
    assert not np.allclose(other.maps, result.maps)  # the Monte-Carlo samples follow the run's seed
    assert BayesPflBackend(BayesPflConfig(**{**opts, "class_name": "capsules"}), backbone=tiny56).topk == 1
    one = BayesPflBackend(BayesPflConfig(**{**opts, "stage": 1}), backbone=tiny56, seed=0).coarse(feats)
    np.testing.assert_allclose(one.maps, result.maps, rtol=1e-5, atol=1e-6)  # the stage changes the image score only
    q = backend.score_queries({k: torch.as_tensor(np.asarray(v[:2])) for k, v in feats.layers.items()},
                              torch.as_tensor(np.asarray(feats.cls[:2])), feats, [0], [None])
    assert q.shape == (2, 4, 4) and torch.isfinite(q).all()
    with pytest.raises(ValueError, match="no class token"):
        backend.score_queries(feats.layers, None, feats, [0], [None])
    with pytest.raises(ValueError, match="needs option 'checkpoint'"):
        BayesPflBackend(BayesPflConfig(class_name="widget"), backbone=tiny56)
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        BayesPflBackend(BayesPflConfig(**{**opts, "stage": 3}), backbone=tiny56)
