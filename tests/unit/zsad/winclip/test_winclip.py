"""WinCLIP: windows, window embeddings and harmonic aggregation against float64 loops; the backend end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anorefiner.backbones import build_backbone
from anorefiner.cache import extract_features, read_features
from anorefiner.data.index import index_category, load_image
from anorefiner.zsad import get_backend
from anorefiner.zsad.winclip.backend import (class_scores, harmonic_aggregation, tensor_preprocess, train_good_source,
                                             visual_association, window_embeddings, window_indices)


@pytest.fixture(scope="module")
def tiny(tiny_clip):
    return build_backbone(tiny_clip, 70, pretrained=None, seed=2)  # 5x5 grid


def test_windows_cover_the_grid():
    w = window_indices((4, 5), 2)
    assert w.shape == (3 * 4, 4) and w[0].tolist() == [0, 1, 5, 6] and w[-1].tolist() == [13, 14, 18, 19]
    assert window_indices((15, 15), 2).shape[0] == 196 and window_indices((15, 15), 3).shape[0] == 169
    with pytest.raises(ValueError, match="window size 6 does not fit the 5x5"):
        window_indices((5, 5), 6)


def test_harmonic_aggregation_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    grid = (4, 5)
    for k in (2, 3):
        windows = window_indices(grid, k)
        scores = torch.rand(3, len(windows), generator=g, dtype=torch.float64) + 0.05
        ref = np.zeros((3, 20))
        for b in range(3):
            for p in range(20):
                cover = [i for i in range(len(windows)) if p in windows[i].tolist()]
                ref[b, p] = len(cover) / sum(1.0 / float(scores[b, i]) for i in cover)
        np.testing.assert_allclose(harmonic_aggregation(scores, windows, grid).reshape(3, -1).numpy(), ref, rtol=1e-12)
    # The 3x3 example of the docstring of anomalib's utils.harmonic_aggregation.
    out = harmonic_aggregation(torch.tensor([[1.0, 0.75, 0.5, 0.25]]), window_indices((3, 3), 2), (3, 3))
    np.testing.assert_allclose(out[0].numpy(), [[1, 0.857143, 0.75], [0.666667, 0.48, 0.375], [0.5, 0.333333, 0.25]],
                               atol=1e-5)


def _slow_window_embedding(bb, seq, patch_ids):
    """One window, float64, block by block: CLS + the window's tokens -> ln_pre -> blocks -> ln_post -> proj."""
    v = bb.visual
    x = torch.cat([seq[:, :1], seq[:, [1 + p for p in patch_ids]]], dim=1)
    x = v.ln_pre(x)
    for block in bb.blocks:
        x = block(x if bb.batch_first else x.transpose(0, 1))
        x = x if bb.batch_first else x.transpose(0, 1)
    return v.ln_post(x[:, 0]) @ v.proj


def test_window_embeddings_match_a_per_window_float64_loop(tiny_clip):
    bb = build_backbone(tiny_clip, 42, pretrained=None, seed=4)  # native size: encode_image comparable
    bb.model.double()
    bb.pos_embed = bb.pos_embed.double()
    x = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seq = bb.embed(x)
    for k in (2, 3):
        windows = window_indices(bb.grid, k)
        fast = window_embeddings(bb, seq, windows)
        with torch.no_grad():
            slow = torch.stack([_slow_window_embedding(bb, seq, w.tolist()) for w in windows], dim=1)
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    # The full sequence through encode_sequences is CLIP's own image embedding.
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_sequences(seq), bb.model.encode_image(x), rtol=1e-10, atol=1e-10)


def test_scores_match_formulas():
    g = torch.Generator().manual_seed(3)
    emb, text = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64)
    for i in range(4):
        e = emb[i].numpy() / np.linalg.norm(emb[i].numpy())
        t = text.numpy() / np.linalg.norm(text.numpy(), axis=1, keepdims=True)
        z = (t @ e) / 0.07
        assert float(class_scores(emb, text, 0.07)[i]) == pytest.approx(np.exp(z[1]) / np.exp(z).sum(), rel=1e-9)
    ref = torch.randn(5, 6, generator=g, dtype=torch.float64)
    va = visual_association(emb[None], ref)[0]
    for i in range(4):
        d = [1 - float(torch.dot(emb[i], r) / emb[i].norm() / r.norm()) for r in ref]
        assert float(va[i]) == pytest.approx(min(d) / 2, rel=1e-9)


@pytest.mark.parametrize("k_shot", [0, 2])
def test_backend_end_to_end(tiny, demo_dataset, tmp_path, k_shot):
    index = index_category(demo_dataset, "tiles", dataset="demo")
    feats = read_features(extract_features(index, tiny, tmp_path / "tiles.h5", batch_size=6))
    paths = list(index[index["split"] == "test"]["image_path"])
    backend = get_backend("winclip", {"class_name": "tiles", "k_shot": k_shot, "device": "cpu", "batch_size": 5},
                          backbone=tiny, seed=1)
    backend.images = lambda idx: [load_image(paths[i]) for i in idx]
    backend.reference_images = train_good_source(demo_dataset, "demo", "tiles")
    result = backend.coarse(feats)
    n = len(feats.ids)
    assert result.maps.shape == (n, 5, 5) and result.scores.shape == (n,)
    assert np.isfinite(result.maps).all() and (result.maps > 0).all() and (result.maps < 1).all()
    if k_shot == 0:  # image score = the class score of the image embedding (of anomalib's pre-processing)
        x = tensor_preprocess(backend.images(range(n)), 70, tiny.mean, tiny.std)
        image_emb = tiny.encode_sequences(tiny.embed(x))
        np.testing.assert_allclose(result.scores, class_scores(image_emb, backend.text, 0.07).numpy(), rtol=1e-4)
    with pytest.raises(NotImplementedError, match="PGT cannot score"):
        backend.score_queries({}, None, feats, [0], [None])


def _aa_bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` float64 weights of an antialiased bicubic resize (PIL's filter, which torch's
    ``antialias=True`` follows): Keys' cubic with a = -0.5, support 2 * max(scale, 1) around the half-pixel centre,
    each row normalised to sum 1."""
    def cubic(x, a=-0.5):
        x = abs(x)
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a if x < 2 else 0.0

    scale = n_in / n_out
    stretch = max(scale, 1.0)
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - 2 * stretch + 0.5), 0), min(int(centre + 2 * stretch + 0.5), n_in)
        for j in range(lo, hi):
            w[i, j] = cubic((j - centre + 0.5) / stretch)
        w[i] /= w[i].sum()
    return w


@pytest.mark.parametrize("shape", [(90, 130), (30, 24), (56, 84)])
def test_anomalib_preprocessing_matches_a_float64_loop(shape):
    """anomalib's WinCLIP pre-processing (float image, antialiased bicubic, CLIP normalisation), not PIL's uint8
    resize, which clamps the overshoot and rounds: the two differ by a few grey levels."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    got = tensor_preprocess([img], 70, mean, std)[0].double().numpy()
    wy, wx = _aa_bicubic_weights(shape[0], 70), _aa_bicubic_weights(shape[1], 70)
    for c in range(3):
        ref = (wy @ (img[:, :, c] / 255.0) @ wx.T - mean[c]) / std[c]
        np.testing.assert_allclose(got[c], ref, rtol=0, atol=2e-5)
    from PIL import Image

    pil = np.asarray(Image.fromarray(img).resize((70, 70), Image.BICUBIC), np.float64) / 255
    assert np.abs(got[0] * std[0] + mean[0] - pil[:, :, 0]).max() > 1 / 255  # not the backbone's PIL resize
    with pytest.raises(ValueError, match="image 0 must be uint8"):
        tensor_preprocess([img.astype(np.float32)], 70, mean, std)


def test_resize_option_picks_the_preprocessing(tiny):
    img = np.random.default_rng(1).integers(0, 256, size=(50, 60, 3), dtype=np.uint8)
    anomalib = get_backend("winclip", {"class_name": "tiles"}, backbone=tiny)
    assert anomalib.last_info["resize"] == "tensor"
    assert torch.equal(anomalib.preprocess([img]), tensor_preprocess([img], 70, tiny.mean, tiny.std))
    pil = get_backend("winclip", {"class_name": "tiles", "resize": "pil"}, backbone=tiny)
    assert torch.equal(pil.preprocess([img]), tiny.preprocess([img]))
    with pytest.raises(ValueError, match="resize must be one of"):
        get_backend("winclip", {"class_name": "tiles", "resize": "nearest"}, backbone=tiny)


def test_bad_requests_are_named(tiny, demo_dataset):
    with pytest.raises(ValueError, match="no class name"):
        get_backend("winclip", {"class_name": ""}, backbone=tiny)
    with pytest.raises(ValueError, match="k_shot=99 but 'tiles' has 6"):
        train_good_source(demo_dataset, "demo", "tiles")(99, 0)
    backend = get_backend("winclip", {"class_name": "tiles"}, backbone=tiny)
    with pytest.raises(ValueError, match="needs --data-root"):
        backend.coarse(type("F", (), {"ids": ["a"]})())


def test_coarse_command_scores_images_of_the_data_root(tiny_clip, demo_dataset, tmp_path):
    from anorefiner.cli import main as cli
    from anorefiner.zsad.store import read_coarse

    feats = tmp_path / "f.h5"
    assert cli(["features", "--root", str(demo_dataset), "--dataset", "demo", "--category", "tiles", "--backbone",
                tiny_clip, "--resolution", "56", "--layers", "4", "--pretrained", "none", "--device", "cpu",
                "--out", str(feats)]) == 0
    out = tmp_path / "c.h5"
    assert cli(["coarse", "--features", str(feats), "--backend-type", "winclip", "--backend-name", "winclip_4shot",
                "--options", '{"k_shot": 2}', "--dataset", "demo", "--category", "tiles", "--backbone", tiny_clip,
                "--pretrained", "none", "--data-root", str(demo_dataset), "--device", "cpu", "--out", str(out)]) == 0
    store = read_coarse(out)
    assert store.maps.shape == (12, 4, 4) and '"k_shot": 2' in store.attrs["backend_info"]
