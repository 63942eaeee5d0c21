from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from anorefiner.cache import Features
from anorefiner.zsad import get_backend
from anorefiner.zsad.byo.backend import load_byo

IDS = ["test/crack/000", "test/good/000", "test/good/001", "test/good/002"]


def _maps():
    m = np.zeros((4, 16, 16), dtype=np.float32)
    m[0, 4:8, 8:12] = 1.0  # one 4x4 block = exactly one cell of a 4x4 grid
    m[2] = np.linspace(0, 1, 16)[None, :]
    return m


def _write(path, ids, maps, scores=None):
    if path.suffix == ".npz":
        extra = {} if scores is None else {"scores": scores}
        np.savez(path, ids=np.array(ids), maps=maps, **extra)
    else:
        with h5py.File(path, "w") as f:
            f["ids"] = np.array(ids, dtype=object).astype(h5py.string_dtype())
            f["maps"] = maps
            if scores is not None:
                f["scores"] = scores


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_load_resizes_reorders_and_scores(tmp_path, suffix):
    maps = _maps()
    order = [2, 0, 3, 1]
    path = tmp_path / f"maps{suffix}"
    _write(path, [IDS[i] for i in order] + ["test/good/extra"], np.concatenate([maps[order], maps[:1]]))
    c = load_byo(path, IDS, (4, 4))
    assert c.ids == IDS and c.maps.shape == (4, 4, 4) and c.maps.dtype == np.float32
    assert c.maps[0, 1, 2] == 1.0 and c.maps[0].sum() == 1.0  # area: the block becomes one cell
    np.testing.assert_allclose(c.scores, maps.reshape(4, -1).max(1))  # no scores -> max of map
    up = load_byo(path, IDS, (32, 32))  # enlarging: bilinear
    assert up.maps.shape == (4, 32, 32) and 0 < up.maps[0].max() <= 1


def test_scores_are_used_when_present(tmp_path):
    path = tmp_path / "m.npz"
    _write(path, IDS, _maps(), scores=np.array([4, 3, 2, 1], dtype=np.float32))
    np.testing.assert_array_equal(load_byo(path, IDS, (4, 4)).scores, [4, 3, 2, 1])


def test_missing_ids_are_named(tmp_path):
    path = tmp_path / "m.h5"
    _write(path, IDS[:2], _maps()[:2])
    with pytest.raises(ValueError, match=r"lacks 2 image id\(s\).*test/good/001.*test/good/002"):
        load_byo(path, IDS, (4, 4))
    with pytest.raises(ValueError, match="unknown extension"):
        load_byo(tmp_path / "m.txt" if (tmp_path / "m.txt").write_text("x") else None, IDS, (4, 4))


def test_byo_backend_coarse_and_musc_proxy(tmp_path):
    path = tmp_path / "m.npz"
    _write(path, IDS, _maps())
    rng = np.random.default_rng(0)
    feats = Features(ids=IDS, layers={"a": rng.normal(size=(4, 4, 4, 8)).astype(np.float32)}, cls=None)
    b = get_backend("byo", {"maps_path": str(path), "musc": {"r_list": [1]}})
    res = b.coarse(feats)
    assert res.maps.shape == (4, 4, 4)
    from anorefiner.zsad.musc import backend as musc

    q = {"a": feats.layers["a"][:2]}
    got = b.score_queries(q, None, feats, [0, 1, 2, 3], [0, 1])
    want = musc.score({"a": torch.from_numpy(feats.layers["a"])}, (1,))[:2]
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
