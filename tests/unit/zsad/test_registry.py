"""Which backends' coarse maps depend on the run's seed (the workflow computes the others once)."""

import numpy as np
import pytest

from anorefiner.zsad import get_backend
from anorefiner.zsad.registry import BACKEND_TYPES, seed_dependent

from .paclip.test_paclip import _feats


@pytest.mark.parametrize("kind, options, expected", [
    ("musc", {"group_size": None}, False),          # the whole test set: no seeded grouping
    ("musc", {"group_size": 30}, True),             # MuSc*: seeded groups (group_order shuffled by default)
    ("musc", {"group_size": 30, "group_order": "index"}, False),
    ("winclip", {}, False), ("winclip", {"k_shot": 4}, True),
    ("april_gan", {}, False), ("vcp_clip", {}, False), ("anomalyclip", {}, False),
    ("rareclip", {}, True), ("adaclip", {}, True), ("paclip", {}, True), ("pad_pam", {}, True),
    ("aa_clip", {}, False), ("bayes_pfl", {}, True),  # Bayes-PFL: Monte-Carlo flow samples from the run's seed
    ("byo", {}, True), ("something_new", {}, True),  # unknown: assumed seed-dependent
])
def test_seed_dependence_by_type_and_options(kind, options, expected):
    assert seed_dependent(kind, options) is expected


def test_every_registered_type_is_decided_on_purpose():
    free = {k for k in BACKEND_TYPES if not seed_dependent(k, {})}
    assert free == {"musc", "winclip", "april_gan", "vcp_clip", "anomalyclip", "aa_clip"}


def test_musc_maps_follow_the_decision():
    """MuSc on the whole set gives the same maps for every seed; MuSc* (seeded groups) does not."""
    feats = _feats(n=11, g=4, c=8)
    opts = {"r_list": [1, 3], "rscin": False}
    whole = [get_backend("musc", dict(opts, group_size=None), seed=s).coarse(feats).maps for s in (0, 1)]
    np.testing.assert_array_equal(whole[0], whole[1])
    grouped = [get_backend("musc_star", dict(opts, group_size=5), seed=s).coarse(feats).maps for s in (0, 1)]
    assert not np.array_equal(grouped[0], grouped[1])
