"""PromptAD: the dual-path forward, the prompt arrangement, the maps and the losses against float64 loops; training
and the backend end to end with the tiny random CLIP."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from anorefiner.backbones import build_backbone
from anorefiner.zsad.promptad.backend import harmonic, textual, upsample, visual
from anorefiner.zsad.promptad.forward import vv_forward
from anorefiner.zsad.promptad.prompts import GENERIC_STATES, CLASS_STATES, PromptLearner, prompt_loss, text_features

from ..reference import bilinear_half_pixel, float64_backbone


@pytest.fixture(scope="module")
def tiny64(tiny_clip):
    return float64_backbone(tiny_clip, 56, seed=3)


def _slow_dual_path(bb, x, surgery, gallery):
    """The official forward literally: per-head attention loops, the hooks keep a *view* of the original path that
    the next block's in-place ``x_ori += ori_res`` changes (CLIPAD/transformer.py l.229-249, 604-613)."""
    v = bb.visual
    blocks = list(bb.blocks)
    n = len(blocks)
    first = n - min(surgery, n)
    x = v.ln_pre(bb.embed(x))

    def heads(block, y):
        a = block.attn
        c = y.shape[-1]
        h, d = a.num_heads, c // a.num_heads
        q, k, val = (y @ a.in_proj_weight[i * c:(i + 1) * c].T + a.in_proj_bias[i * c:(i + 1) * c] for i in range(3))
        vv, ori = torch.zeros_like(y), torch.zeros_like(y)
        for head in range(h):
            s = slice(head * d, (head + 1) * d)
            ori[..., s] = torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(d), -1) @ val[..., s]
            vv[..., s] = torch.softmax(val[..., s] @ val[..., s].transpose(-1, -2) / math.sqrt(d), -1) @ val[..., s]
        return a.out_proj(vv), a.out_proj(ori)

    hooked = {}
    state = x
    with torch.no_grad():
        for i, block in enumerate(blocks):
            if i < first:
                state = block(state)
                out = state
            elif not isinstance(state, list):  # start of the dual path
                vv, ori = heads(block, block.ln_1(state))
                x_ori = state + ori
                x_ori = x_ori + block.mlp(block.ln_2(x_ori))
                state = [state + vv, x_ori]
                out = state
            else:
                x_vv, x_ori = state
                vv, ori = heads(block, block.ln_1(x_ori))
                x_ori += ori  # in place: a view hooked on the previous block sees it
                x_ori = x_ori + block.mlp(block.ln_2(x_ori))
                x_vv += vv
                state = [x_vv, x_ori]
                out = state
            if i + 1 in gallery:
                hooked[i + 1] = (out[1] if isinstance(out, list) else out)[:, 1:]
        x_vv, x_ori = state
        cls = v.ln_post(x_ori[:, 0]) @ v.proj
        tokens = v.ln_post(x_vv[:, 1:]) @ v.proj
    norm = lambda t: t / t.norm(dim=-1, keepdim=True)  # noqa: E731
    return norm(cls), norm(tokens), [norm(hooked[b]) for b in sorted(gallery)]


@pytest.mark.parametrize("surgery, gallery", [(12, (1, 2)), (12, (3, 4)), (2, (1,))])
def test_dual_path_forward_matches_the_official_loop(tiny64, surgery, gallery):
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fast = vv_forward(tiny64, x, surgery, gallery)
    cls, tokens, hooked = _slow_dual_path(tiny64, x, surgery, gallery)
    torch.testing.assert_close(fast["cls"], cls, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast["tokens"], tokens, rtol=1e-10, atol=1e-10)
    for f, s in zip(fast["gallery"], hooked):
        torch.testing.assert_close(f, s, rtol=1e-10, atol=1e-10)
    # the class embedding is CLIP's own (the original path is CLIP's forward)
    clip = torch.nn.functional.normalize(tiny64.encode_sequences(tiny64.embed(x)), dim=-1)
    torch.testing.assert_close(fast["cls"], clip, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="do not fit"):
        vv_forward(tiny64, x, surgery, (9,))


def test_prompts_are_arranged_as_the_official_learner(tiny_clip):
    bb = build_backbone(tiny_clip, 56, pretrained=None, seed=0)
    p, ab, n_ctx = 3, 4, 4
    learner = PromptLearner(bb, "bottle", n_pro=p, n_ctx=n_ctx, n_pro_ab=ab, n_ctx_ab=1, seed=5)
    out = learner()
    states = GENERIC_STATES + CLASS_STATES["bottle"]
    assert [out[k].shape[0] for k in ("normal", "handle", "learned")] == [p, p * len(states), p * ab]
    # model.py l.119-150: expand/reshape of the two banks, written as the loops they stand for
    normal_of_learned = [q for _ in range(ab) for q in range(p)]  # normal_ctx.unsqueeze(0).expand(n_pro_ab, ...)
    abnormal_of_learned = [a for _ in range(p) for a in range(ab)]  # abnormal_ctx.unsqueeze(0).expand(n_pro, ...)
    for j in range(p * ab):
        torch.testing.assert_close(out["learned"][j, 1:1 + n_ctx], learner.normal_ctx[normal_of_learned[j]])
        torch.testing.assert_close(out["learned"][j, 1 + n_ctx], learner.abnormal_ctx[abnormal_of_learned[j], 0])
    for s in range(len(states)):
        for q in range(p):
            torch.testing.assert_close(out["handle"][s * p + q, 1:1 + n_ctx], learner.normal_ctx[q])
    # around the contexts: the token embeddings of the official sentences
    from anorefiner.backbones.clip_prompting import token_embeddings, tokenize

    sent = tokenize(bb, ["N N N N damaged bottle.", "N N N N A bottle.", "N N N N bottle."])
    emb = token_embeddings(bb, sent)
    torch.testing.assert_close(out["handle"][0, n_ctx + 1:], emb[0, n_ctx + 1:])
    torch.testing.assert_close(out["learned"][0, n_ctx + 2:], emb[1, n_ctx + 2:])
    torch.testing.assert_close(out["normal"][0, :1], emb[2, :1])
    # initialisation N(0, 0.02), reproducible from the seed
    again = PromptLearner(bb, "bottle", n_pro=p, n_ctx=n_ctx, n_pro_ab=ab, n_ctx_ab=1, seed=5)
    torch.testing.assert_close(again.normal_ctx, learner.normal_ctx)
    assert 0.01 < float(learner.normal_ctx.detach().std()) < 0.03
    # a category outside MVTec AD / VisA has the generic states only; metal_nut is spelled "metal nut"
    assert PromptLearner(bb, "widget", 1).n_states == len(GENERIC_STATES)


def _slow_loss(f, normal, handle, learned, scale, lambda1, margin):
    """train_*.py l.69-110 with TripletLoss, as float64 loops over the rows (f: [N, D] or [N, L, D])."""
    norm = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    abn = np.concatenate([handle, learned])
    match = np.sum((norm(handle).mean(0) - norm(learned).mean(0)) ** 2)
    na, aa = norm(normal.mean(0)), norm(abn.mean(0))
    rows = f.reshape(-1, f.shape[-1])
    ce = 0.0
    for r in rows:
        logits = scale * np.concatenate([[r @ na], norm(abn) @ r])
        ce += -(logits[0] - np.log(np.sum(np.exp(logits))))
    ce /= len(rows)
    pos = ((f - na) ** 2).sum(axis=1)  # summed over dimension 1, as written
    neg = ((f - aa) ** 2).sum(axis=1)
    trip = np.maximum(pos - neg + margin, 0).mean()
    return ce + trip + lambda1 * match


@pytest.mark.parametrize("shape", [(3, 8), (2, 5, 8)])
def test_prompt_loss_matches_a_loop(shape):
    g = torch.Generator().manual_seed(1)
    f = torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    feats = {k: torch.randn(n, 8, generator=g, dtype=torch.float64) for k, n in (("normal", 3), ("handle", 6),
                                                                                    ("learned", 4))}
    got = float(prompt_loss(f, feats, 4.6, 0.001, 0.1))
    want = _slow_loss(f.numpy(), *(feats[k].numpy() for k in ("normal", "handle", "learned")), 4.6, 0.001, 0.1)
    assert got == pytest.approx(want, rel=1e-10)
    text = text_features(feats).numpy()
    abn = np.concatenate([feats["handle"].numpy(), feats["learned"].numpy()]).mean(0)
    np.testing.assert_allclose(text[1], abn / np.linalg.norm(abn), rtol=1e-12)


def test_scores_and_maps_match_loops():
    g = torch.Generator().manual_seed(2)
    norm = lambda t: torch.nn.functional.normalize(t, dim=-1)  # noqa: E731
    tokens, text = norm(torch.randn(2, 9, 6, generator=g, dtype=torch.float64)), norm(torch.randn(2, 6, generator=g,
                                                                                               dtype=torch.float64))
    t = textual(tokens, text, 4.6).numpy()
    for n in range(2):
        for i in range(9):
            z = 4.6 * (text.numpy() @ tokens[n, i].numpy())
            assert t[n, i] == pytest.approx(math.exp(z[1]) / np.exp(z).sum(), rel=1e-10)
    mids = [norm(torch.randn(2, 9, 5, generator=g, dtype=torch.float64)) for _ in range(2)]
    gal = [norm(torch.randn(7, 5, generator=g, dtype=torch.float64)) for _ in range(2)]
    vis = visual(mids, gal).numpy()
    for n in range(2):
        for i in range(9):
            want = 0.5 * sum(min(1 - float(m[n, i] @ r) for r in g_) / 2 for m, g_ in zip(mids, gal))
            assert vis[n, i] == pytest.approx(want, rel=1e-10)
    assert float(harmonic(torch.tensor(0.5), torch.tensor(0.25))) == pytest.approx(1 / (2 + 4))
    up = upsample(torch.from_numpy(vis), (3, 3), 10).numpy()
    for n in range(2):
        np.testing.assert_allclose(up[n], bilinear_half_pixel(vis[n].reshape(3, 3), 10), rtol=1e-6)


def test_training_and_backend_end_to_end(tiny_clip, demo_dataset, tmp_path):
    from anorefiner.cache import extract_features, read_features
    from anorefiner.data.index import index_category, load_image
    from anorefiner.zsad import get_backend
    from anorefiner.zsad.promptad.train import TrainConfig, check_checkpoint, train_fewshot
    from anorefiner.zsad.shots import TrainGood

    bb = build_backbone(tiny_clip, 56, pretrained=None, seed=1)
    ck = train_fewshot(bb, demo_dataset, "demo", "tiles", TrainConfig(epochs=4), tmp_path / "p.pt", k_shot=2, seed=3)
    check_checkpoint(ck, bb)
    meta = torch.load(ck, map_location="cpu", weights_only=True)["meta"]
    losses = json.loads(meta["losses"])
    assert all(v[-1] < v[0] for v in losses.values()), losses  # SGD on the shots lowers both losses
    index = index_category(demo_dataset, "tiles", dataset="demo")
    feats = read_features(extract_features(index, bb, tmp_path / "f.h5", batch_size=6))
    paths = list(index[index["split"] == "test"]["image_path"])
    opts = {"class_name": "tiles", "device": "cpu", "gallery_blocks": [1, 2], "map_size": 56, "pre_resize": 64}
    results = {}
    for k in (0, 2):
        extra = {"checkpoint": str(ck)} if k else {}
        be = get_backend("promptad", dict(opts, k_shot=k, **extra), backbone=bb, seed=3)
        be.images = lambda idx: [load_image(paths[i]) for i in idx]
        be.train_images = TrainGood(demo_dataset, "demo", "tiles")
        results[k] = be.coarse(feats)
        assert results[k].maps.shape == (12, 4, 4) and np.isfinite(results[k].scores).all()
        assert be.last_info["shots"] == ([] if k == 0 else TrainGood(demo_dataset, "demo", "tiles").draw(2, 3))
    # 0 shots: the textual score of CLIP's own class embedding of the (BGR) test images; 2 shots: a harmonic
    # fusion ab / (a + b) of two scores in [0, 1], hence at most 0.5
    from anorefiner.zsad.promptad.forward import preprocess

    zero = get_backend("promptad", dict(opts, k_shot=0), backbone=bb, seed=3)
    x = preprocess(bb, [load_image(p) for p in paths], 64, bgr=True)
    cls = torch.nn.functional.normalize(bb.encode_sequences(bb.embed(x)), dim=-1)
    np.testing.assert_allclose(results[0].scores, textual(cls, zero.text["cls"], zero.scale).numpy(), rtol=1e-4)
    assert (results[2].scores <= 0.5).all() and (results[2].scores > 0).all()
    with pytest.raises(ValueError, match="trained on category 'tiles', not 'widget'"):
        get_backend("promptad", dict(opts, class_name="widget", k_shot=2, checkpoint=str(ck)), backbone=bb)
    with pytest.raises(ValueError, match="holds 2 shots, the backend wants 4"):
        get_backend("promptad", dict(opts, k_shot=4, checkpoint=str(ck)), backbone=bb)
    with pytest.raises(ValueError, match="needs option 'checkpoint'"):
        get_backend("promptad", dict(opts, k_shot=2), backbone=bb)


def test_test_images_go_in_bgr_as_the_official_code(tiny_clip):
    from anorefiner.zsad.promptad.forward import preprocess

    bb = build_backbone(tiny_clip, 56, pretrained=None, seed=1)
    img = np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    rgb, bgr = preprocess(bb, [img], 64, bgr=False), preprocess(bb, [img], 64, bgr=True)
    torch.testing.assert_close(bgr, preprocess(bb, [img[..., ::-1].copy()], 64, bgr=False))
    assert not torch.allclose(rgb, bgr)


def test_train_backend_command_trains_one_category(tiny_clip, demo_dataset, tmp_path, caplog):
    """``anorefiner train-backend`` with the few-shot arguments rule train_fewshot passes."""
    from anorefiner.cli import main as cli

    base = ["train-backend", "--backend-type", "promptad", "--root", str(demo_dataset), "--dataset", "demo",
            "--backbone", tiny_clip, "--resolution", "56", "--pretrained", "none", "--device", "cpu",
            "--options", '{"epochs": 1}']
    out = tmp_path / "c.pt"
    assert cli([*base, "--category", "widget", "--k-shot", "3", "--shots-seed", "2", "--out", str(out)]) == 0
    meta = torch.load(out, map_location="cpu", weights_only=True)["meta"]
    assert meta["category"] == "widget" and int(meta["shots_seed"]) == 2 and len(json.loads(meta["shots"])) == 3
    assert cli([*base, "--out", str(tmp_path / "x.pt")]) == 1
    assert cli([*base, "--category", "widget", "--k-shot", "3", "--out", str(tmp_path / "x.pt")]) == 1
    assert "--category and --k-shot are required" in caplog.text and "--shots-seed is required" in caplog.text
    assert not (tmp_path / "x.pt").exists()
