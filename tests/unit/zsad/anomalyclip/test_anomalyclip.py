"""AnomalyCLIP: DPAM and compound prompts against float64 loops; maps and scores; checkpoints; training; backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anorefiner.zsad.anomalyclip.backend import (CHECKPOINT_KEY, AnomalyCLIPBackend, AnomalyCLIPConfig, PromptLearner,
                                         encode_text, full_map, image_scores, load_prompt_learner, patch_probs, smooth)
from anorefiner.zsad.anomalyclip.dpam import (default_dpam_layer, dpam_start, dual_path_forward, global_feature,
                                              project_tokens, vv_attention)
from anorefiner.zsad.anomalyclip.train import TrainConfig, check_checkpoint, train_backend, train_prompts
from anorefiner.zsad.april_gan.backend import patch_map
from anorefiner.zsad.april_gan.train import training_samples

SMALL = {"n_ctx": 3, "depth": 3, "t_n_ctx": 2}


# ---------------------------------------------------------------- float64 loop references
def _layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _attention_loop(block, x, vv: bool, mask=None):
    """Per sample and head: q, k, v from in_proj; scores with loops; q = k = v for the v-v path."""
    attn = block.attn
    n, length, c = x.shape
    heads = attn.num_heads
    d = c // heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    out = torch.zeros(n, length, c, dtype=x.dtype)
    for s in range(n):
        q_all, k_all, v_all = (x[s] @ w[i * c : (i + 1) * c].T + b[i * c : (i + 1) * c] for i in range(3))
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            v = v_all[:, sl]
            q, k = (v, v) if vv else (q_all[:, sl], k_all[:, sl])
            for i in range(length):
                scores = torch.stack([(q[i] * k[j]).sum() / math.sqrt(d) for j in range(length)])
                if mask is not None:
                    scores = scores + mask[i]
                p = torch.exp(scores - scores.max())
                p = p / p.sum()
                out[s, i, sl] = (p[:, None] * v).sum(0)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def _block_loop(block, x, mask=None):
    x = x + _attention_loop(block, _layer_norm(x, block.ln_1), vv=False, mask=mask)
    return x + block.mlp(_layer_norm(x, block.ln_2))


def test_vv_attention_matches_the_per_head_loop(tiny64):
    g = torch.Generator().manual_seed(0)
    block = tiny64.blocks[2]
    x = torch.randn(2, 5, 64, generator=g, dtype=torch.float64)
    torch.testing.assert_close(vv_attention(block, x), _attention_loop(block, x, vv=True), rtol=1e-9, atol=1e-9)


def test_dual_path_forward_matches_the_loop(tiny64):
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(2, 3, 56, 56, generator=g, dtype=torch.float64)
    start = dpam_start(4, 3)
    assert start == 3  # DPAM_layer=3 replaces the last 2 of 4 blocks (20 of 24: blocks 6-24)
    got, last = dual_path_forward(tiny64, batch, (2, 3, 4), dpam_layer=3)
    v = tiny64.visual
    ori = v.ln_pre(tiny64.embed(batch))
    vv, ref = None, {}
    for i, block in enumerate(tiny64.blocks, start=1):
        if i >= start:  # second path: v-v attention of the ORIGINAL path's ln_1 input, no FFN
            vv = (ori if vv is None else vv) + _attention_loop(block, _layer_norm(ori, block.ln_1), vv=True)
        ori = _block_loop(block, ori)
        ref[i] = ori if vv is None else vv
    for i in (2, 3, 4):
        torch.testing.assert_close(got[i], ref[i], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(last, ori, rtol=1e-5, atol=1e-8)
    # features: ln_post + proj + L2 norm (second path); global: original CLS @ proj without ln_post
    f = project_tokens(tiny64, got[4])
    manual = _layer_norm(ref[4], v.ln_post) @ v.proj
    torch.testing.assert_close(f, manual / manual.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-8)
    gl = ori[:, 0] @ v.proj
    torch.testing.assert_close(global_feature(tiny64, last), gl / gl.norm(dim=-1, keepdim=True))
    with pytest.raises(ValueError, match="dpam_layer=20 must lie in 1..5"):
        dual_path_forward(tiny64, batch, (4,), dpam_layer=20)
    # the official DPAM_layer=20 on 24 blocks (dual from block 6); other depths keep its single-path share
    assert [default_dpam_layer(n) for n in (24, 12, 4)] == [20, 11, 4]
    assert dpam_start(24, None) == 6 and dpam_start(4, 1) == 5  # 1: no dual path
    no_dual, last_single = dual_path_forward(tiny64, batch, (2, 4), dpam_layer=1)
    torch.testing.assert_close(no_dual[4], last_single)


@pytest.mark.parametrize("fp16", [True, False])
def test_compound_prompts_overwrite_positions_in_the_text_blocks(tiny64, fp16):
    learner = PromptLearner(tiny64, **SMALL, seed=5).double()
    got = encode_text(tiny64, learner, compound_fp16=fp16)
    model = tiny64.model
    prompts, tokens, compound = learner()
    x = prompts.double() + model.positional_embedding
    mask = model.attn_mask
    for i, block in enumerate(model.transformer.resblocks, start=1):
        if 2 <= i <= SMALL["depth"]:  # blocks 2..depth: positions 1..t_n_ctx replaced
            ctx = compound[i - 2].half().double() if fp16 else compound[i - 2]
            x = x.clone()
            x[:, 1 : 1 + SMALL["t_n_ctx"]] = ctx
        x = _block_loop(block, x, mask=mask)
    x = _layer_norm(x, model.ln_final)
    eot = tokens.argmax(-1)
    ref = torch.stack([x[r, eot[r]] for r in range(2)]) @ model.text_projection
    ref = ref / ref.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    # the prompt: SOS + 3 learned vectors + "object ." / "damaged object ." + EOS
    assert int(eot[0]) == 1 + 3 + 2 and int(eot[1]) == 1 + 3 + 3


def _bilinear_half_pixel(grid: np.ndarray, size: int) -> np.ndarray:
    """Loop bilinear upsampling with align_corners=False (half-pixel centres, edge clamped), float64."""
    h, w = grid.shape
    out = np.zeros((size, size))
    for i in range(size):
        y = min(max((i + 0.5) * h / size - 0.5, 0.0), h - 1)
        y0 = min(int(math.floor(y)), h - 2)
        for j in range(size):
            x = min(max((j + 0.5) * w / size - 0.5, 0.0), w - 1)
            x0 = min(int(math.floor(x)), w - 2)
            dy, dx = y - y0, x - x0
            out[i, j] = (grid[y0, x0] * (1 - dy) * (1 - dx) + grid[y0, x0 + 1] * (1 - dy) * dx
                         + grid[y0 + 1, x0] * dy * (1 - dx) + grid[y0 + 1, x0 + 1] * dy * dx)
    return out


def test_maps_and_scores_match_the_float64_loop():
    g = torch.Generator().manual_seed(2)
    n, h, w, d, size = 2, 3, 3, 5, 9
    text = torch.nn.functional.normalize(torch.randn(2, d, generator=g, dtype=torch.float64), dim=-1)
    layers = [torch.nn.functional.normalize(torch.randn(n, h, w, d, generator=g, dtype=torch.float64), dim=-1)
              for _ in range(2)]
    full = full_map([patch_probs(f, text, 0.07) for f in layers], size)
    ref = np.zeros((n, size, size))
    for f in layers:
        for b in range(n):
            probs = np.zeros((2, h, w))
            for i in range(h):
                for j in range(w):
                    z = np.array([float((f[b, i, j] * text[c]).sum()) / 0.07 for c in range(2)])
                    probs[:, i, j] = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            up = [_bilinear_half_pixel(probs[c], size) for c in range(2)]
            ref[b] += (up[1] + 1 - up[0]) / 2
    np.testing.assert_allclose(full.numpy(), ref, rtol=1e-9, atol=1e-10)
    from scipy.ndimage import gaussian_filter

    sm = smooth(full, 4.0)
    np.testing.assert_allclose(sm.numpy(), np.stack([gaussian_filter(m, sigma=4) for m in ref]), rtol=1e-9)
    assert torch.equal(smooth(full, 0.0), full)
    glob = torch.randn(3, d, generator=g, dtype=torch.float64)
    got = image_scores(glob, text, 0.07).numpy()
    for i in range(3):
        gi = glob[i].numpy() / np.linalg.norm(glob[i].numpy())
        z = text.numpy() @ gi / 0.07
        assert got[i] == pytest.approx(np.exp(z[1]) / np.exp(z).sum(), rel=1e-9)


# ---------------------------------------------------------------- checkpoints
def _save(path, state):
    torch.save({CHECKPOINT_KEY: state}, path)
    return path


def test_checkpoint_round_trip_and_errors(tiny56, tmp_path):
    learner = PromptLearner(tiny56, **SMALL, seed=3)
    names = set(learner.state_dict())
    assert names == {"ctx_pos", "ctx_neg", "token_prefix_pos", "token_suffix_pos", "tokenized_prompts_pos",
                     "token_prefix_neg", "token_suffix_neg", "tokenized_prompts_neg", "compound_prompts_text.0",
                     "compound_prompts_text.1", "compound_prompt_projections.0.weight",
                     "compound_prompt_projections.0.bias", "compound_prompt_projections.1.weight",
                     "compound_prompt_projections.1.bias"}
    assert learner.ctx_pos.shape == (1, 1, 3, 32) and learner.token_suffix_pos.shape == (1, 1, 77 - 4, 32)
    state = learner.state_dict()
    loaded = load_prompt_learner(_save(tmp_path / "ok.pth", state), tiny56, **SMALL)
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # the unused projections may have any output width (the official files hold 896)
    wide = {**state, **{f"compound_prompt_projections.{i}.{p}": torch.zeros((896, 32) if p == "weight" else (896,))
                        for i in range(2) for p in ("weight", "bias")}}
    assert load_prompt_learner(_save(tmp_path / "wide.pth", wide), tiny56, **SMALL).compound_prompt_projections[0] \
        .out_features == 896
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_prompt_learner(tmp_path / "missing.pth", tiny56, **SMALL)
    torch.save({"state_dict": state}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth: no 'prompt_learner'"):
        load_prompt_learner(tmp_path / "other.pth", tiny56, **SMALL)
    bad = {**state, "ctx_neg": torch.zeros(1, 1, 3, 48)}
    with pytest.raises(ValueError, match=r"shape.pth: ctx_neg has shape \(1, 1, 3, 48\), expected \(1, 1, 3, 32\)"):
        load_prompt_learner(_save(tmp_path / "shape.pth", bad), tiny56, **SMALL)
    extra = {k: v for k, v in state.items() if k != "compound_prompts_text.1"}
    with pytest.raises(ValueError, match=r"keys.pth: keys differ .*missing \['compound_prompts_text.1'\]"):
        load_prompt_learner(_save(tmp_path / "keys.pth", extra), tiny56, **SMALL)
    with pytest.raises(ValueError, match="ok.pth: keys differ"):
        load_prompt_learner(tmp_path / "ok.pth", tiny56, n_ctx=3, depth=9, t_n_ctx=2)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pth: not a weights-only torch file"):
        load_prompt_learner(tmp_path / "junk.pth", tiny56, **SMALL)
    cfg = TrainConfig(**SMALL)
    check_checkpoint(tmp_path / "ok.pth", tiny56, cfg)
    check_checkpoint(tmp_path / "ok.pth", None, cfg)
    with pytest.raises(ValueError, match="shape.pth: ctx_neg"):
        check_checkpoint(tmp_path / "shape.pth", tiny56, cfg)
    with pytest.raises(ValueError, match=r"keys.pth: missing keys \['compound_prompts_text.1'\]"):
        check_checkpoint(tmp_path / "keys.pth", None, cfg)


# ---------------------------------------------------------------- training and the backend
def test_one_epoch_of_training_is_finite_and_deterministic(tiny56, demo_dataset, tmp_path):
    rows = training_samples(demo_dataset, "demo", max_images=4)
    cfg = TrainConfig(epochs=1, batch_size=4, dpam_layer=3, seed=7, workers=2, **SMALL)
    out = train_prompts(tiny56, rows, cfg, tmp_path / "ck" / "prompts.pt")
    obj = torch.load(out, map_location="cpu", weights_only=True)
    meta = obj["meta"]
    assert np.isfinite(meta["epoch_losses"]).all() and np.isfinite(meta["epoch_image_losses"]).all()
    init = PromptLearner(tiny56, **SMALL, seed=7).state_dict()
    state = obj[CHECKPOINT_KEY]
    assert not torch.equal(state["ctx_pos"], init["ctx_pos"])  # trained
    assert not torch.equal(state["compound_prompts_text.0"], init["compound_prompts_text.0"])
    assert torch.equal(state["compound_prompt_projections.0.weight"], init["compound_prompt_projections.0.weight"])
    again = train_backend(tiny56, demo_dataset, "demo", TrainConfig(epochs=1, batch_size=4, dpam_layer=3, seed=7,
                                                                    workers=1, max_images=4, **SMALL),
                          tmp_path / "again.pt")
    again_state = torch.load(again, weights_only=True)[CHECKPOINT_KEY]
    for k in state:
        assert torch.equal(state[k], again_state[k]), k
    with pytest.raises(FileNotFoundError, match="auxiliary dataset 'visa': folder .*nowhere does not exist"):
        train_backend(tiny56, tmp_path / "nowhere", "visa", cfg, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="no training images"):
        train_prompts(tiny56, [], cfg, tmp_path / "x.pt")


def test_backend_end_to_end_from_images(tiny56, demo_dataset, tmp_path):
    from types import SimpleNamespace

    from anorefiner.config import ConfigError, from_dict
    from anorefiner.data.index import index_category, load_image

    index = index_category(demo_dataset, "widget", dataset="demo")
    paths = list(index.image_path)[:5]
    ck = _save(tmp_path / "p.pt", PromptLearner(tiny56, **SMALL, seed=1).state_dict())
    opts = {"checkpoint": str(ck), "dpam_layer": 3, "device": "cpu", "batch_size": 2, **SMALL}
    backend = AnomalyCLIPBackend(from_dict(AnomalyCLIPConfig, opts), backbone=tiny56)
    feats = SimpleNamespace(ids=[f"i{i}" for i in range(len(paths))], layers={}, cls=None)
    with pytest.raises(ValueError, match="needs --data-root"):
        backend.coarse(feats)
    backend.images = lambda idx: [load_image(paths[i]) for i in idx]
    result = backend.coarse(feats)
    assert result.maps.shape == (5, 4, 4) and result.scores.shape == (5,)
    assert (result.maps >= 0).all() and (result.maps <= 1).all() and ((result.scores > 0) & (result.scores < 1)).all()
    assert backend.last_info["map_layers"] == [4] and "token grid" in backend.last_info["map_level"]
    layers, maps, scores = backend.features_and_scores([3, 1])
    assert list(layers) == ["4"] and layers["4"].shape == (2, 4, 4, 32)
    np.testing.assert_allclose(np.linalg.norm(layers["4"], axis=-1), 1, rtol=1e-5)
    np.testing.assert_allclose(maps, result.maps[[3, 1]], rtol=1e-5, atol=1e-6)  # batching does not matter
    np.testing.assert_allclose(scores, result.scores[[3, 1]], rtol=1e-5, atol=1e-6)
    # the token-grid map is the area mean of the official full-resolution map
    out = backend.score_batch(tiny56.preprocess(backend.images([0])))
    assert out["full"].shape == (1, 56, 56)
    np.testing.assert_allclose(patch_map(out["full"], (4, 4)).numpy(), result.maps[:1], rtol=1e-5, atol=1e-6)
    single = AnomalyCLIPBackend(from_dict(AnomalyCLIPConfig, opts), backbone=tiny56, images=backend.images)
    assert single.coarse(SimpleNamespace(ids=["a"], layers={}, cls=None)).maps.shape == (1, 4, 4)
    with pytest.raises(ValueError, match="empty category"):
        single.features_and_scores([])
    with pytest.raises(NotImplementedError, match="PGT cannot score"):
        backend.score_queries({}, None, feats, [0], [None])
    with pytest.raises(ConfigError, match="dpam_layr"):
        from_dict(AnomalyCLIPConfig, {**opts, "dpam_layr": 3})
    with pytest.raises(ValueError, match="needs option 'checkpoint'"):
        AnomalyCLIPBackend(AnomalyCLIPConfig(), backbone=tiny56)
    with pytest.raises(ValueError, match="map_layers"):
        AnomalyCLIPBackend(from_dict(AnomalyCLIPConfig, {**opts, "map_layers": [5]}), backbone=tiny56)
    with pytest.raises(ValueError, match="dpam_layer=20"):
        AnomalyCLIPBackend(from_dict(AnomalyCLIPConfig, {**opts, "dpam_layer": 20}), backbone=tiny56)
    default = AnomalyCLIPBackend(from_dict(AnomalyCLIPConfig, {k: v for k, v in opts.items() if k != "dpam_layer"}),
                                 backbone=tiny56, images=backend.images)
    assert default.last_info["dpam_layer"] == 4 and default.features_and_scores([0])[1].shape == (1, 4, 4)


def test_position_embedding_is_the_official_bilinear_resize(tiny64):
    from anorefiner.zsad.anomalyclip.dpam import with_position_embedding

    native = tiny64.visual.positional_embedding.detach()
    (gh, gw), (nh, nw) = tiny64.native_grid, tiny64.grid
    assert (gh, gw) == (3, 3) and (nh, nw) == (4, 4)
    got = with_position_embedding(tiny64, "bilinear")
    assert got.model is tiny64.model and got.pos_embed.shape == (1 + nh * nw, 64)
    torch.testing.assert_close(got.pos_embed[0], native[0])
    grid = native[1:].reshape(gh, gw, -1).numpy()
    for ch in (0, 17, 63):
        ref = _bilinear_half_pixel(grid[:, :, ch], nh)
        np.testing.assert_allclose(got.pos_embed[1:, ch].reshape(nh, nw).numpy(), ref, rtol=1e-9, atol=1e-12)
    assert with_position_embedding(tiny64, "backbone") is tiny64
    with pytest.raises(ValueError, match="pos_embed must be one of"):
        with_position_embedding(tiny64, "bicubic")
