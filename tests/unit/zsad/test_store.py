from __future__ import annotations

import numpy as np
import pytest

from anorefiner.zsad.store import read_coarse, write_coarse

IDS = ["test/broken/000", "test/good/000", "test/good/001"]


def _data():
    rng = np.random.default_rng(0)
    return rng.random((3, 4, 5)).astype(np.float32), rng.random(3).astype(np.float32)


def test_round_trip(tmp_path):
    maps, scores = _data()
    out = write_coarse(tmp_path / "a" / "seed0.h5", IDS, maps, scores,
                       {"backend": "musc", "options": {"topmin": 0.3}, "seed": 0, "features": tmp_path / "f.h5"})
    c = read_coarse(out, expect_ids=IDS)
    assert c.ids == IDS
    np.testing.assert_array_equal(c.maps, maps)
    np.testing.assert_array_equal(c.scores, scores)
    assert c.maps.dtype == np.float32 and c.scores.dtype == np.float32
    assert c.attrs["backend"] == "musc" and c.attrs["seed"] == 0
    assert c.attrs["options"] == {"topmin": 0.3}
    assert "torch" in c.attrs["versions"]
    assert [p.name for p in out.parent.iterdir()] == ["seed0.h5"]  # no temp file left behind


def test_id_mismatch_names_first_differing_id(tmp_path):
    maps, scores = _data()
    write_coarse(tmp_path / "s.h5", IDS, maps, scores)
    with pytest.raises(ValueError, match=r"#1 is 'test/good/000'.*'test/good/999'"):
        read_coarse(tmp_path / "s.h5", expect_ids=[IDS[0], "test/good/999", IDS[2]])
    with pytest.raises(ValueError, match="3 image ids but the feature cache has 2"):
        read_coarse(tmp_path / "s.h5", expect_ids=IDS[:2])


def test_failed_write_leaves_old_file(tmp_path):
    maps, scores = _data()
    path = tmp_path / "s.h5"
    write_coarse(path, IDS, maps, scores, {"backend": "old"})
    with pytest.raises(ValueError, match="need maps"):
        write_coarse(path, IDS, maps[:2], scores)
    bad = maps.copy()
    bad[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="test/good/001"):
        write_coarse(path, IDS, bad, scores)

    class Boom:  # an attribute h5py cannot store: fails mid-write, after the file was opened
        pass

    with pytest.raises(TypeError):
        write_coarse(path, IDS, maps * 2, scores, {"backend": Boom()})
    assert read_coarse(path).attrs["backend"] == "old"
    np.testing.assert_array_equal(read_coarse(path).maps, maps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        read_coarse(tmp_path / "nope.h5")
