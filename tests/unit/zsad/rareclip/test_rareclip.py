"""RareCLIP: memory formulas against float64 loops; stream order; checkpoints; training; the backend end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anorefiner.backbones import build_backbone
from anorefiner.cache import extract_features, read_features
from anorefiner.data.index import index_category
from anorefiner.zsad.april_gan.backend import CHECKPOINT_KEY, LinearAdapters
from anorefiner.zsad.rareclip.backend import (PROMPTS, RareClipBackend, RareClipConfig, RareStream, stream_order,
                                      text_maps)
from anorefiner.zsad.rareclip.memory import (RarityBank, aggregate, gaussian_blur, loose_similarity, rarity,
                                             rescore, scs_keep, stream_weights)
from anorefiner.zsad.rareclip.train import (MVTEC_EXCLUDED, TrainConfig, align_loss, check_checkpoint,
                                            filter_rows, train_text_branch)
from anorefiner.zsad.april_gan.train import training_samples

from ..reference import bilinear_align_corners

LAYERS = ("1", "2", "3", "4")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


# ------------------------------------------------------------------------------ float64 loop references
def _ref_aggregate(tok: np.ndarray, r: int) -> np.ndarray:
    h, w, c = tok.shape
    out = np.zeros((h * w, c))
    for i in range(h):
        for j in range(w):
            acc = np.zeros(c)
            for di in range(-(r // 2), r // 2 + 1):
                for dj in range(-(r // 2), r // 2 + 1):
                    acc += tok[min(max(i + di, 0), h - 1), min(max(j + dj, 0), w - 1)]
            acc /= r * r
            out[i * w + j] = acc / np.sqrt((acc * acc).sum())
    return out


def _ref_ls(vals: list[float], ratio=0.01) -> list[float]:
    k = max(1, int(len(vals) * (1 - ratio)))
    ref = sorted(vals)[k - 1]
    return [min(v / ref, 1.0) for v in vals]


def _ref_rarity(feats, pfm, psm, topk=3, ratio=0.01, thd=0.3):
    """Per patch, per prototype: top-k, LS, ref_prob, top rows, 1 - estimate; the new PSM row."""
    n, m, s = len(feats), len(pfm), len(psm)
    sims = [[float(np.dot(feats[i], pfm[j])) for j in range(m)] for i in range(n)]
    tops = []
    for i in range(n):
        order = sorted(range(m), key=lambda j: -sims[i][j])[:topk]
        tops.append([(sims[i][j], j) for j in order])
    flat = _ref_ls([v for row in tops for v, _ in row], ratio)
    ref_prob = np.zeros((s, n))
    rare = np.zeros(n)
    for i in range(n):
        for row in range(s):
            ref_prob[row, i] = sum(flat[i * topk + q] * psm[row][tops[i][q][1]] for q in range(topk)) / topk
        col = sorted(ref_prob[:, i], reverse=True)[: max(1, math.ceil(s * thd))]
        rare[i] = 1 - sum(col) / len(col)
    ref_sim = _ref_ls([max(sims[i][j] for i in range(n)) for j in range(m)], ratio)
    return rare, ref_prob, np.array(ref_sim)


def _ref_scs(pfm, keep):
    m = len(pfm)
    score = [max([0.0] + [float(np.dot(pfm[a], pfm[b])) for b in range(a)]) for a in range(m)]
    return sorted(sorted(range(m), key=lambda a: score[a])[:keep])


class _RefBank:
    """Lists of prototypes and PSM rows, updated one element at a time (float64)."""

    def __init__(self, keep, rows):
        self.keep, self.rows, self.pfm, self.psm = keep, rows, None, None

    def step(self, feats):
        rare = None
        if self.pfm is None:
            self.pfm, self.psm = [f.copy() for f in feats], [[1.0] * len(feats)]
        else:
            rare, ref_prob, ref_sim = _ref_rarity(feats, self.pfm, self.psm)
            self.psm = [list(r) + list(ref_prob[k]) for k, r in enumerate(self.psm)]
            self.psm.append(list(ref_sim) + [1.0] * len(feats))
            self.pfm = self.pfm + [f.copy() for f in feats]
        if len(self.pfm) > self.keep:
            kept = _ref_scs(self.pfm, self.keep)
            self.pfm = [self.pfm[a] for a in kept]
            self.psm = [[r[a] for a in kept] for r in self.psm]
        if len(self.psm) > self.rows:
            self.psm = self.psm[1:]
        return rare


# ------------------------------------------------------------------------------ formulas
@pytest.mark.parametrize("r", [1, 3])
def test_aggregation_matches_the_replicate_loop(r):
    tok = _rand(4, 5, 6)
    np.testing.assert_allclose(aggregate(tok, r).numpy(), _ref_aggregate(tok.numpy(), r), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="r=2"):
        aggregate(tok, 2)


def test_loose_similarity_and_rarity_match_the_loops():
    vals = _rand(250).abs()
    np.testing.assert_allclose(loose_similarity(vals.clone()).numpy(), _ref_ls(vals.tolist()), rtol=1e-12)
    feats = torch.nn.functional.normalize(_rand(7, 5, seed=1), dim=-1)
    pfm = torch.nn.functional.normalize(_rand(11, 5, seed=2), dim=-1)
    psm = torch.rand(4, 11, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for chunk in (3, 2048):
        got = rarity(feats, pfm, psm, chunk=chunk)
        ref = _ref_rarity(feats.numpy(), pfm.numpy(), psm.tolist())
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-9, atol=1e-12)


def test_scs_keeps_the_least_redundant_prototypes_in_index_order():
    pfm = torch.nn.functional.normalize(_rand(13, 4, seed=4), dim=-1)
    for chunk in (2, 5, 100):
        assert scs_keep(pfm, 6, chunk).tolist() == _ref_scs(pfm.numpy(), 6)


def test_memory_update_sampling_and_row_limit_match_the_loop():
    """PFM/PSM appends, SCS above 2 images' patches, and a 3-row PSM limit over a 6-image stream."""
    patches = 6
    bank, ref = RarityBank(keep_prototypes=2 * patches, keep_rows=3, chunk=4), _RefBank(2 * patches, 3)
    for t in range(6):
        feats = aggregate(_rand(2, 3, 8, seed=10 + t), 3 if t % 2 else 1)
        scored = bank.score(feats)
        want = ref.step(feats.numpy())
        bank.update(feats, scored)
        if t == 0:
            assert scored is None and want is None
        else:
            np.testing.assert_allclose(scored[0].numpy(), want, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(bank.pfm.numpy(), np.array(ref.pfm), rtol=1e-12)
        np.testing.assert_allclose(bank.psm.numpy(), np.array(ref.psm), rtol=1e-9, atol=1e-12)
        # the kept SCS values: each prototype's max similarity to the earlier ones, as from scratch
        p = np.array(ref.pfm)
        want_earlier = [max([float(p[a] @ p[b]) for b in range(a)], default=-np.inf) for a in range(len(p))]
        np.testing.assert_allclose(bank.earlier.numpy(), want_earlier, rtol=1e-9, atol=1e-12)
    assert bank.pfm.shape == (12, 8) and bank.psm.shape == (3, 12)


def test_stream_weighting_and_rescoring():
    assert [stream_weights(t) for t in range(6)] == [(0.0, 1.0)] + [(2 / 3, 2 / 3)] * 3 + [(4 / 3, 1 / 3)] * 2
    sim, scores = _rand(47, seed=5).abs() + 0.1, _rand(47, seed=6)
    got = float(rescore(sim, scores))
    k = min(math.ceil(47 / 20), 9)
    s = (sim / sim.max()).tolist()
    top = sorted(range(47), key=lambda i: -s[i])[:k]
    z = [math.exp(200 * s[i]) for i in top]
    assert got == pytest.approx(sum(zi / sum(z) * float(scores[i]) for zi, i in zip(z, top)), rel=1e-9)
    assert float(rescore(sim[:20], scores[:20])) == float(scores[19])  # n <= 20: the raw score


def test_gaussian_blur_matches_torchvision_and_a_loop():
    from anorefiner._compat import import_torchvision

    maps = _rand(2, 30, 31, seed=7)
    got = gaussian_blur(maps, 25, 4.0)
    tv = import_torchvision()
    want = tv.transforms.functional.gaussian_blur(maps.float().unsqueeze(1), [25, 25], [4.0, 4.0]).squeeze(1)
    np.testing.assert_allclose(got.numpy(), want.double().numpy(), atol=1e-5)
    x = np.arange(25) - 12.0
    k = np.exp(-0.5 * (x / 4.0) ** 2)
    k /= k.sum()
    m = maps[0].numpy()
    refl = lambda i, n: -i if i < 0 else (2 * (n - 1) - i if i >= n else i)  # noqa: E731
    for i, j in [(0, 0), (15, 3), (29, 30)]:
        v = sum(k[a] * k[b] * m[refl(i + a - 12, 30), refl(j + b - 12, 31)] for a in range(25) for b in range(25))
        assert float(got[0, i, j]) == pytest.approx(v, rel=1e-9)
    with pytest.raises(ValueError, match="too large"):
        gaussian_blur(maps[:, :10, :10])


def test_text_prompts_and_maps():
    normal, abnormal = PROMPTS.sentences("ignored")
    assert len(normal) == 490 and len(abnormal) == 350 and "a bad photo of a flawless texture." in normal
    g = torch.Generator().manual_seed(8)
    adapters = LinearAdapters(6, 4, 2).double()
    toks = [_rand(1, 5, 6, seed=9), _rand(1, 5, 6, seed=10)]
    text = torch.nn.functional.normalize(torch.randn(2, 4, generator=g, dtype=torch.float64), dim=-1)
    got = text_maps(adapters, toks, text, 20.0)[0].detach().numpy()
    for i in range(5):
        probs = []
        for fc, t in zip(adapters.fc, toks):
            p = _unit((fc.weight.detach() @ t[0, i] + fc.bias.detach()).tolist())
            z = [20 * sum(a * b for a, b in zip(p, text[c].tolist())) for c in range(2)]
            probs.append(math.exp(z[1]) / (math.exp(z[0]) + math.exp(z[1])))
        assert got[i] == pytest.approx(sum(probs) / 2, rel=1e-9)


def test_training_alignment_loss():
    p = [torch.nn.functional.normalize(_rand(2, 3, 4, seed=s), dim=-1) for s in (11, 12)]
    g = _rand(2, 4, seed=13)
    vals = [(float(p[l][b, i] @ (g[b] / g[b].norm())) - 1) ** 2 for l in range(2) for b in range(2) for i in range(3)]
    assert float(align_loss(p, g)) == pytest.approx(sum(vals) / len(vals), rel=1e-9)


def test_stream_order_is_seeded():
    assert stream_order(10, 3) == stream_order(10, 3) and stream_order(10, 3) != stream_order(10, 4)
    assert sorted(stream_order(10, 3)) == list(range(10))
    import random

    lst = list(range(10))
    random.seed(3)
    random.shuffle(lst)  # test.py's order for the same seed
    assert stream_order(10, 3) == lst


# ------------------------------------------------------------------------------ checkpoints, training, backend
def _save(path, state):
    torch.save({CHECKPOINT_KEY: state}, path)
    return path


@pytest.fixture(scope="module")
def tiny56(tiny_clip):
    return build_backbone(tiny_clip, 56, layers=[1, 2, 3, 4], pretrained=None, seed=0)


def test_checkpoint_errors(tmp_path, tiny56):
    ok = _save(tmp_path / "ok.pt", LinearAdapters(64, 32, 4).state_dict())
    check_checkpoint(ok, tiny56)
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        check_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="3 adapters but"):
        check_checkpoint(_save(tmp_path / "three.pt", LinearAdapters(64, 32, 3).state_dict()))
    with pytest.raises(ValueError, match="take 48-d tokens, the backbone gives 64"):
        check_checkpoint(_save(tmp_path / "w.pt", LinearAdapters(48, 32, 4).state_dict()), tiny56)
    torch.save({"other": {}}, tmp_path / "k.pt")
    with pytest.raises(ValueError, match="k.pt: no 'trainable_linearlayer'"):
        check_checkpoint(tmp_path / "k.pt")
    with pytest.raises(ValueError, match="needs option 'checkpoint'"):
        RareClipBackend(RareClipConfig(), backbone=tiny56)


def test_training_one_epoch_is_finite_and_deterministic(tiny56, demo_dataset, tmp_path):
    rows = training_samples(demo_dataset, "demo", max_images=4)
    defect = next(r for r in rows if r["category"] == "tiles" and r["defect"] != "good")["defect"]
    assert len(filter_rows(rows, (f"tiles/{defect}",))) < len(rows) and MVTEC_EXCLUDED[0] == "transistor/misplaced"
    with pytest.raises(ValueError, match="not 'category/defect'"):
        filter_rows(rows, ("tiles",))
    cfg = TrainConfig(epochs=1, batch_size=4, mosaic_p=0.5, text_layers=LAYERS, exclude_defects=(f"tiles/{defect}",),
                      workers=2)
    a = train_text_branch(tiny56, rows, cfg, tmp_path / "a.pt", text_cache=str(tmp_path / "text"))
    from dataclasses import replace

    b = train_text_branch(tiny56, rows, replace(cfg, workers=1), tmp_path / "b.pt", text_cache=str(tmp_path / "text"))
    oa, ob = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    assert all(np.isfinite(oa["meta"]["epoch_losses"])) and oa["meta"]["n_images"] < len(rows)
    for k, v in oa[CHECKPOINT_KEY].items():
        torch.testing.assert_close(v, ob[CHECKPOINT_KEY][k], rtol=0, atol=0)
    check_checkpoint(a, tiny56)
    with pytest.raises(ValueError, match=r"text_layers \['12'\]"):
        train_text_branch(tiny56, rows, TrainConfig(text_layers=("12",)), tmp_path / "c.pt")
    from anorefiner.zsad.rareclip.train import train_backend

    with pytest.raises(FileNotFoundError, match="auxiliary dataset 'visa': folder .*nowhere does not exist"):
        train_backend(tiny56, tmp_path / "nowhere", "visa", cfg, tmp_path / "d.pt")


@pytest.fixture(scope="module")
def widget(tiny56, demo_dataset, tmp_path_factory):
    index = index_category(demo_dataset, "widget", dataset="demo")
    return read_features(extract_features(index, tiny56, tmp_path_factory.mktemp("f") / "w.h5", batch_size=6))


def _backend(tiny56, tmp_path, seed=0, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ck = _save(tmp_path / "a.pt", LinearAdapters(64, 32, 4).state_dict())
    opts = {"text_layers": LAYERS, "rare_layers": LAYERS, "device": "cpu", "text_cache": str(tmp_path / "text"), **kw}
    cfg = RareClipConfig(checkpoint=str(ck), **opts)
    return RareClipBackend(cfg, backbone=tiny56, seed=seed)


def _subset(feats, idx):
    from anorefiner.cache import Features

    return Features(ids=[feats.ids[i] for i in idx], layers={k: v[idx] for k, v in feats.layers.items()},
                    cls=feats.cls[idx], attrs=feats.attrs)


def test_backend_end_to_end_in_original_order(tiny56, widget, tmp_path):
    be = _backend(tiny56, tmp_path, seed=1, rescore_freq=3)
    res = be.coarse(widget)
    n = len(widget.ids)
    assert res.maps.shape == (n, 4, 4) and np.isfinite(res.maps).all() and np.isfinite(res.scores).all()
    assert be.last_info["stream_order"] == stream_order(n, 1) and "area mean" in be.last_info["map_level"]
    again = _backend(tiny56, tmp_path, seed=1, rescore_freq=3).coarse(widget)
    np.testing.assert_array_equal(again.maps, res.maps)
    np.testing.assert_array_equal(again.scores, res.scores)
    # The same images fed in stream order with a seed whose order is the identity... replayed by hand:
    order = stream_order(n, 1)
    maps, prob, g, grid = be._prepare(widget.layers, widget.cls)
    stream = RareStream(be.config, 16, 56)
    for t, i in enumerate(order):
        full, score = stream.step(maps[i], prob[i], g[i], be._raw(widget.layers, i), grid)
        assert float(score) == pytest.approx(float(res.scores[i]), rel=1e-5)
        if t == 0:  # the first image: text branch only (max with its own prior = itself)
            text_full = torch.nn.functional.interpolate(maps[i].reshape(1, 1, 4, 4), size=(56, 56), mode="bilinear",
                                                        align_corners=True)[:, 0]
            torch.testing.assert_close(full, gaussian_blur(text_full)[0])
    other = _backend(tiny56, tmp_path, seed=2, rescore_freq=3).coarse(widget)
    assert not np.allclose(other.scores, res.scores)


def test_one_image_empty_category_and_missing_layers(tiny56, widget, tmp_path):
    be = _backend(tiny56, tmp_path)
    one = be.coarse(_subset(widget, [3]))
    maps, prob, _, _ = be._prepare(_subset(widget, [3]).layers, widget.cls[[3]])
    full = gaussian_blur(torch.nn.functional.interpolate(maps[0].reshape(1, 1, 4, 4), size=(56, 56),
                                                         mode="bilinear", align_corners=True)[:, 0])
    assert float(one.scores[0]) == pytest.approx(float(full.max() + prob[0]), rel=1e-5)
    with pytest.raises(ValueError, match="empty category"):
        be.coarse(_subset(widget, []))
    bad = _backend(tiny56, tmp_path, rare_layers=("1", "9"))
    with pytest.raises(ValueError, match=r"layers \['9'\] are not in the features"):
        bad.coarse(widget)


def test_score_queries_leaves_the_reference_memory_alone(tiny56, widget, tmp_path):
    be = _backend(tiny56, tmp_path)
    q = {k: torch.as_tensor(v[:3]).float() for k, v in widget.layers.items()}
    qcls = torch.as_tensor(widget.cls[:3])
    refs = list(range(len(widget.ids)))
    got = be.score_queries(q, qcls, widget, refs, [0, 1, 1])
    assert got.shape == (3, 4, 4) and torch.isfinite(got).all()
    # Each query alone gives the same map (no update between queries), and its exclusion matters.
    alone = be.score_queries({k: v[1:2] for k, v in q.items()}, qcls[1:2], widget, refs, [1])
    torch.testing.assert_close(alone[0], got[1])
    kept = be.score_queries({k: v[1:2] for k, v in q.items()}, qcls[1:2], widget, refs, [None])
    assert not torch.allclose(kept[0], got[1])
    with pytest.raises(ValueError, match="exclude has 1 entries for 3 queries"):
        be.score_queries(q, qcls, widget, refs, [0])




def _ref_blur(m: np.ndarray, ksize: int, sigma: float) -> np.ndarray:
    x = np.arange(ksize) - (ksize - 1) / 2
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    n = m.shape[0]
    refl = lambda i: -i if i < 0 else (2 * (n - 1) - i if i >= n else i)  # noqa: E731
    half = ksize // 2
    out = np.zeros_like(m)
    for i in range(n):
        for j in range(n):
            out[i, j] = sum(k[a] * k[b] * m[refl(i + a - half), refl(j + b - half)]
                            for a in range(ksize) for b in range(ksize))
    return out


def test_stream_step_matches_a_float64_loop():
    """Foreground prior, rarity banks, AAIF image rarity, stream weighting, upsampling, blur, score and
    re-scoring of a 7-image stream, against a per-element float64 re-implementation."""
    h = w = 3
    layers, size, ks, sg = ("a", "b"), 8, 5, 1.0
    cfg = RareClipConfig(rare_layers=layers, keep_ftime=2.0, keep_rows=3, rescore_freq=2, blur_kernel=ks,
                         blur_sigma=sg, map_size=size)
    stream = RareStream(cfg, h * w, size)
    banks = {(r, l): _RefBank(2 * h * w, 3) for r in (1, 3) for l in layers}
    fg, aaifs, globs, scores = None, {l: [] for l in layers}, [], []
    for t in range(7):
        tm = torch.rand(h * w, generator=torch.Generator().manual_seed(100 + t), dtype=torch.float64)
        tp = torch.rand((), generator=torch.Generator().manual_seed(200 + t), dtype=torch.float64)
        g = torch.nn.functional.normalize(_rand(4, seed=300 + t), dim=0)
        raw = {l: _rand(h, w, 5, seed=400 + 10 * t + i) + 1.0 for i, l in enumerate(layers)}
        full, score = stream.step(tm, tp, g, raw, (h, w))
        # ---- reference
        tmn, rn, gn = tm.numpy(), {l: v.numpy() for l, v in raw.items()}, g.numpy()
        fg = tmn.copy() if fg is None else (fg * t + tmn) / (t + 1)
        text = np.maximum(tmn, fg)
        fg_idx = sorted(range(h * w), key=lambda i: -fg[i])[: int(h * w * 0.5)]
        rare = np.zeros(h * w)
        for (r, l), bank in banks.items():
            got = bank.step(_ref_aggregate(rn[l], r))
            if got is not None:
                rare += got
        rare /= len(banks)
        gsim = [float(gn @ q) for q in globs] + [1.0]
        fg_score = 0.0
        for l in layers:
            tok = rn[l].reshape(h * w, -1)
            a = sum(tok[i] for i in fg_idx) / len(fg_idx)
            a = a / np.sqrt((a * a).sum())
            if aaifs[l]:
                s = [float(a @ q) for q in aaifs[l]]
                top = sorted(s, reverse=True)[: math.ceil(len(s) * 0.3)]
                fg_score += 1 - sum(top) / len(top)
                gsim = [x + y for x, y in zip(gsim, s + [1.0])]
            aaifs[l].append(a)
        fg_score /= len(layers)
        if fg_score > 0:
            rare = rare + fg_score * (1 + (fg - fg.min()) / (fg.max() - fg.min()))
        wr, wt = (0.0, 1.0) if t == 0 else ((2 / 3, 2 / 3) if t <= 3 else (4 / 3, 1 / 3))
        amap = (wr * rare + wt * text).reshape(h, w)
        ref_full = _ref_blur(bilinear_align_corners(amap, size), ks, sg)
        raw_score = ref_full.max() + float(tp)
        scores.append(raw_score)
        globs.append(gn)
        n = len(gsim)
        want = raw_score
        if n > 2:
            k = min(math.ceil(n / 2), 9)
            s = [x / max(gsim) for x in gsim]
            top = sorted(range(n), key=lambda i: -s[i])[:k]
            z = [math.exp(200 * s[i]) for i in top]
            want = sum(zi / sum(z) * scores[i] for zi, i in zip(z, top))
        np.testing.assert_allclose(full.numpy(), ref_full, rtol=1e-9, atol=1e-12)
        assert float(score) == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert stream.banks[(1, "a")].pfm.shape[0] == 2 * h * w and stream.banks[(1, "a")].psm.shape[0] == 3
