"""The stream mode (anorefiner.stream) on the demo dataset: equivalence with offline PGT, bad input, the log."""

import json
import os
import types

import numpy as np
import pytest
import torch

from anorefiner.cache import Features
from anorefiner.config import from_dict
from anorefiner.refine.pgt import RefinerOptions, run_pgt
from anorefiner.stream import StreamConfig, run_stream
from anorefiner.stream.results import ResultsLog, read_maps
from anorefiner.stream.rows import Rows
from anorefiner.stream.scorer import MuscWindowScorer, online_scorer
from anorefiner.zsad.store import Coarse

# the tiny ARD of tests/unit/refine/test_pgt.py; groups of 4 over the 12 demo test images: 3 groups
TINY = {
    "ard": {"feat_channels": 16, "anomaly_channels": 8, "aa_channels": 12, "head_channels": 8},
    "pgt": {"group_size": 4, "n_pseudo_normal": 2, "n_anomalies_per_normal": 2, "epochs": 2, "batch_size": 2,
            "group_order": "index", "first_group_ard": "coarse", "calibration": "none"},
}
WINDOW, MIN_REFS, E = 5, 2, 32


def _options(**pgt):
    options = from_dict(RefinerOptions, json.loads(json.dumps(TINY)))
    for key, value in pgt.items():
        setattr(options.pgt, key, value)
    return options


def _textures():
    gen = np.random.default_rng(0)
    return [gen.integers(0, 255, size=(32, 32, 3), dtype=np.uint8) for _ in range(3)]


def _stream(tiles, out, n=12, pgt=None, **config):
    cfg = StreamConfig(window=WINDOW, min_references=MIN_REFS, eval_resolution=E, overlay=False, **config)
    return run_stream(list(tiles["paths"][:n]), out, backbone=tiles["backbone"], backend_name="musc",
                      backend=tiles["backend"], options=_options(**(pgt or {})), config=cfg, seed=0,
                      textures=_textures())


def _offline(tiles, n=12, **pgt):
    """Offline PGT of the same grouping: features of each image, MuSc maps by the window rule written out
    with MuSc's own functions (the first MIN_REFS + 1 images: MuSc on that set), then run_pgt."""
    from anorefiner.data.index import load_image
    from anorefiner.zsad.musc.backend import score, score_queries

    bb, paths = tiles["backbone"], tiles["paths"][:n]
    parts = [bb.forward(bb.preprocess([load_image(p)]))[0] for p in paths]
    layers = {k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]}
    feats = Features(ids=[str(i) for i in range(len(paths))], layers=layers)
    first = MIN_REFS + 1
    maps = np.zeros((len(paths),) + layers[next(iter(layers))].shape[1:3], np.float32)
    maps[:first] = score({k: torch.as_tensor(v[:first]) for k, v in layers.items()}, topmin=0.3).numpy()
    for i in range(first, len(paths)):
        refs = list(range(max(0, i - WINDOW), i))
        maps[i] = score_queries({k: torch.as_tensor(v[[i]]) for k, v in layers.items()},
                                {k: torch.as_tensor(v[refs]) for k, v in layers.items()})[0].numpy()
    coarse = Coarse(ids=feats.ids, maps=maps, scores=maps.reshape(len(maps), -1).max(1))
    # the same backend as the stream's: MuSc, with its window as the pseudo-anomalies' references
    backend = MuscWindowScorer(tiles["backend"], window=WINDOW, min_references=MIN_REFS)
    return coarse, run_pgt(feats, coarse, paths, bb, backend, _options(**pgt), seed=0, textures=_textures(),
                           eval_resolution=E)


def test_streamed_maps_equal_offline_pgt_of_the_same_grouping(tiles, tmp_path):
    summary = _stream(tiles, tmp_path / "out", wait_for_ard=True)
    assert summary == {"scored": 12, "skipped": 0, "groups_trained": 3}
    coarse, ref = _offline(tiles)
    log = ResultsLog(tmp_path / "out" / "results.jsonl").scored
    assert [e["path"] for e in log] == tiles["paths"]
    got = [read_maps(tmp_path / "out" / e["maps"]) for e in log]
    np.testing.assert_allclose(np.stack([g["coarse_patch"] for g in got]), coarse.maps, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.stack([g["coarse"] for g in got]), ref.maps["coarse"], rtol=0, atol=1e-6)
    assert [e["group"] for e in log] == [1] * 4 + [2] * 4 + [3] * 4
    assert [e["map"] for e in log] == ["coarse"] * 4 + ["refined"] * 8
    assert [e["ard_group"] for e in log] == [None] * 4 + [1] * 4 + [2] * 4
    later = slice(4, 12)
    np.testing.assert_allclose(np.stack([g["ard"] for g in got[later]]), ref.maps["ard"][later], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.stack([g["final"] for g in got[later]]), ref.maps["combined"][later], rtol=0,
                               atol=1e-5)
    np.testing.assert_allclose([e["score"] for e in log[later]], ref.scores["combined"][later], rtol=0, atol=1e-5)
    # group 1: the coarse map itself; offline (first_group_ard "coarse") holds it on group 1's coarse scale
    first = np.stack([g["final"] for g in got[:4]])
    np.testing.assert_allclose(first, ref.maps["coarse"][:4], rtol=0, atol=1e-6)
    lo, hi = ref.attrs["coarse_norm"]["lo"], ref.attrs["coarse_norm"]["hi"]
    np.testing.assert_allclose((first - lo) / (hi - lo), ref.maps["combined"][:4], rtol=0, atol=1e-5)
    np.testing.assert_allclose([e["coarse_score"] for e in log], coarse.scores, rtol=0, atol=1e-6)
    # the ARD actually changed the maps (the comparison above is not between two copies of the coarse map)
    assert np.abs(ref.maps["ard"][later]).max() > 0.05
    groups = [json.loads(line) for line in (tmp_path / "out" / "groups.jsonl").read_text().splitlines()]
    assert [g["group"] for g in groups] == [1, 2, 3]


@pytest.mark.parametrize("mode", ["isotonic", "quantile"])
def test_calibration_is_fitted_on_the_ards_own_group_and_applied_to_the_next(tiles, tmp_path, mode):
    """pgt.calibration online: offline PGT fits it on the group it refines; the stream, which has not seen that group
    yet, fits it on the group the ARD was trained on. The ARD of group 1 on group 1's own images is offline PGT's
    'ard' output under first_group_ard 'self' (same training)."""
    from anorefiner.refine.combine import calibration_map

    _stream(tiles, tmp_path / "out", n=8, pgt={"calibration": mode}, wait_for_ard=True)
    _, ref = _offline(tiles, n=8, first_group_ard="self")
    log = ResultsLog(tmp_path / "out" / "results.jsonl").scored
    got = [read_maps(tmp_path / "out" / e["maps"]) for e in log[4:]]
    lo, hi = ref.attrs["coarse_norm"]["lo"], ref.attrs["coarse_norm"]["hi"]
    coarse_n = (ref.maps["coarse"] - lo) / (hi - lo)
    fitted = calibration_map(coarse_n[:4], ref.maps["ard"][:4], mode)
    c, a = coarse_n[4:], ref.maps["ard"][4:]
    expected = np.where(c >= 0, 0.5 * c * (1.0 + fitted(a)), c)  # the gate, written out
    np.testing.assert_allclose(np.stack([g["ard"] for g in got]), a, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.stack([g["final"] for g in got]), expected, rtol=0, atol=1e-4)
    assert not np.allclose(expected, np.where(c >= 0, 0.5 * c * (1.0 + a), c), atol=1e-2)  # calibration matters


def test_bad_input_is_logged_and_skipped_and_folder_order_is_mtime_then_name(tiles, tmp_path):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    good = tiles["paths"][:4]
    names = ["b.png", "a.png", "c.png", "d.png"]
    for name, src in zip(names, good):
        (folder / name).write_bytes(open(src, "rb").read())
    (folder / "broken.png").write_bytes(b"not an image at all")
    Image.new("RGB", (48, 64)).save(folder / "small.png")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    base = 1_700_000_000
    mtimes = {"b.png": base, "a.png": base, "broken.png": base + 1, "c.png": base + 2, "small.png": base + 3,
              "d.png": base + 4}
    for name, t in mtimes.items():
        os.utime(folder / name, (t, t))
    cfg = StreamConfig(window=WINDOW, min_references=MIN_REFS, eval_resolution=E, refine=False, poll_s=0.05,
                       idle_timeout_s=0.5)
    summary = run_stream(folder, tmp_path / "out", backbone=tiles["backbone"], backend_name="musc",
                         backend=tiles["backend"], options=_options(), config=cfg)
    assert summary == {"scored": 4, "skipped": 2, "groups_trained": 0}
    log = ResultsLog(tmp_path / "out" / "results.jsonl").entries
    skipped = {e["name"]: e["reason"] for e in log if e["status"] == "skipped"}
    assert set(skipped) == {"broken.png", "small.png"}
    assert skipped["broken.png"].startswith("unreadable") and "broken.png" in skipped["broken.png"]
    assert skipped["small.png"] == "size 64x48, the stream's images are 64x64"
    scored = [e for e in log if e["status"] == "ok"]
    assert [e["name"] for e in scored] == ["a.png", "b.png", "c.png", "d.png"]  # mtime, then name
    assert all((tmp_path / "out" / e["overlay"]).is_file() for e in scored)
    # MuSc's first MIN_REFS + 1 images waited for each other; the 4th one is scored against the window before it
    assert [e["references"] for e in scored] == [[1, 2], [0, 2], [0, 1], [0, 2]]


def test_a_cut_off_last_log_line_is_dropped_on_restart(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"status": "ok", "index": 0, "path": "/a.png"}\n{"status": "ok", "ind')
    log = ResultsLog(path)
    assert [e["path"] for e in log.entries] == ["/a.png"]
    assert path.read_text() == '{"status": "ok", "index": 0, "path": "/a.png"}\n'
    log.append({"status": "skipped", "path": "/b.png"})
    assert len(path.read_text().splitlines()) == 2
    path.write_text('{"status": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        ResultsLog(path)


def test_backends_that_cannot_score_online_are_refused():
    from anorefiner.zsad.aa_clip import AaClipConfig
    from anorefiner.zsad.vcp_clip import VcpClipConfig

    for name, why in (("paclip", "whole test set"), ("byo", "file"), ("rareclip", "not checkpointed"),
                      ("promptad", "few-shot")):
        with pytest.raises(ValueError, match=f"backend '{name}' cannot score a stream: .*{why}"):
            online_scorer(name, types.SimpleNamespace(name=name), window=30, min_references=4)
    for name, config in (("vcp_clip", VcpClipConfig()), ("aa_clip", AaClipConfig())):
        backend = types.SimpleNamespace(name=name, config=config)
        with pytest.raises(ValueError, match=f"'{name}' .*class_minmax: false"):
            online_scorer(name, backend, window=30, min_references=4)
        config.class_minmax = False
        assert online_scorer(name, backend, window=30, min_references=4).refinable == (name == "vcp_clip")


def test_pgt_options_that_need_a_whole_group_are_refused(tiles, tmp_path):
    for section, values, match in (("pgt", {"coarse_norm": "group_minmax"}, "coarse_norm"),
                                   ("pgt", {"query_references": "seen"}, "query_references"),
                                   ("pgt", {"safeguard": True}, "safeguard")):
        options = _options()
        setattr(getattr(options, section), *next(iter(values.items())))
        with pytest.raises(ValueError, match=match):
            run_stream([], tmp_path / "out", backbone=tiles["backbone"], backend_name="musc",
                       backend=tiles["backend"], options=options)


def test_restart_with_other_settings_names_the_difference(tiles, tmp_path):
    _stream(tiles, tmp_path / "out", refine=False, max_images=5)
    with pytest.raises(ValueError, match="stream.window: 5 there, 6 now"):
        run_stream([], tmp_path / "out", backbone=tiles["backbone"], backend_name="musc", backend=tiles["backend"],
                   options=_options(), config=StreamConfig(window=6, min_references=MIN_REFS, eval_resolution=E,
                                                           refine=False, overlay=False))


def test_rows_index_like_an_array_and_name_a_dropped_row():
    rows = Rows("features[x]")
    for i in range(5):
        rows.add(i, np.full((2, 3), i, np.float32))
    assert rows.shape == (5, 2, 3) and len(rows) == 5
    np.testing.assert_array_equal(rows[np.array([3, 1])][:, 0, 0], [3, 1])
    np.testing.assert_array_equal(rows[1:3][:, 0, 0], [1, 2])
    rows.drop_before(2)
    assert rows.kept() == [2, 3, 4] and rows.shape == (5, 2, 3)
    with pytest.raises(IndexError, match=r"image 1 is not held \(held: 2..4\)"):
        rows[[1, 2]]


def test_a_per_image_backend_streams_its_own_maps_and_is_refined(tiles, tiny_clip, tmp_path):
    """APRIL-GAN (tiny random CLIP and adapters): each streamed coarse map is the backend's map of that image."""
    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import load_image
    from anorefiner.zsad import get_backend
    from anorefiner.zsad.april_gan.backend import CHECKPOINT_KEY, LinearAdapters

    clip = build_backbone(tiny_clip, 42, pretrained=None, seed=0)
    torch.save({CHECKPOINT_KEY: LinearAdapters(64, 32, 4).state_dict()}, tmp_path / "adapters.pt")
    backend = get_backend("april_gan", {"checkpoint": str(tmp_path / "adapters.pt"), "class_name": "tiles",
                                        "device": "cpu", "text_cache": str(tmp_path / "text")}, backbone=clip)
    paths = tiles["paths"][:8]
    run_stream(paths, tmp_path / "out", backbone=clip, backend_name="april_gan", backend=backend, options=_options(),
               config=StreamConfig(eval_resolution=E, wait_for_ard=True, overlay=False), textures=_textures())
    log = ResultsLog(tmp_path / "out" / "results.jsonl").scored
    layers, cls = clip.forward(clip.preprocess([load_image(p) for p in paths]))
    offline = backend.coarse(Features(ids=paths, layers={k: v.numpy() for k, v in layers.items()}, cls=cls.numpy()))
    got = np.stack([read_maps(tmp_path / "out" / e["maps"])["coarse_patch"] for e in log])
    np.testing.assert_allclose(got, offline.maps, rtol=0, atol=1e-5)
    np.testing.assert_allclose([e["coarse_score"] for e in log], offline.scores, rtol=0, atol=1e-5)
    assert [e["map"] for e in log] == ["coarse"] * 4 + ["refined"] * 4
    assert "references" not in log[0]
