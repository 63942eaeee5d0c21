"""Prompt ensembles: sentence sets, the two ensembling rules against a float64 loop, the per-class cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anorefiner.backbones import build_backbone
from anorefiner.zsad.prompts import PROMPT_SETS, ensemble, get_prompt_set, text_embeddings


@pytest.fixture(scope="module")
def tiny(tiny_clip):
    return build_backbone(tiny_clip, 42, pretrained=None, seed=1)


def _reference(backbone, class_name, ps):
    """One sentence at a time, float64: the ensemble as prompt_ensemble.py / anomalib describe it."""
    rows = []
    for states in (ps.normal, ps.abnormal):
        acc, count = None, 0
        for state in states:
            for template in ps.templates:
                e = backbone.encode_text([template.format(state.format(class_name))], normalize=False)[0].double()
                if ps.ensemble == "normalized_mean":
                    e = e / torch.sqrt((e * e).sum())
                acc = e if acc is None else acc + e
                count += 1
        m = acc / count
        rows.append(m / torch.sqrt((m * m).sum()))
    return torch.stack(rows)


def test_prompt_sets_match_the_official_counts():
    normal, abnormal = PROMPT_SETS["april_gan"].sentences("metal_nut")
    assert len(normal) == 7 * 35 and len(abnormal) == 5 * 35
    assert normal[0] == "a bad photo of a metal_nut." and abnormal[-1] == "this is one metal_nut with damage in the scene."
    normal, abnormal = PROMPT_SETS["winclip"].sentences("pcb1")
    assert len(normal) == 7 * 21 and len(abnormal) == 4 * 21
    assert normal.count("a jpeg corrupted photo of the pcb1.") == 2


@pytest.mark.parametrize("rule", ["normalized_mean", "raw_mean"])
def test_ensemble_rules_against_a_loop(rule):
    e = torch.randn(9, 5, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 10).float()[:, None]
    acc = np.zeros(5)
    for row in e.double().numpy():
        acc += row / np.linalg.norm(row) if rule == "normalized_mean" else row
    acc /= 9
    np.testing.assert_allclose(ensemble(e, rule).numpy(), acc / np.linalg.norm(acc), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ensemble rule 'median'"):
        ensemble(e, "median")


@pytest.mark.parametrize("name", ["april_gan", "winclip"])
def test_text_embeddings_match_the_reference_and_are_cached(tiny, name, tmp_path):
    ps = get_prompt_set(name)
    text = text_embeddings(tiny, "widget", name, cache_dir=tmp_path)
    assert text.shape == (2, 32)
    torch.testing.assert_close(text.double(), _reference(tiny, "widget", ps), rtol=1e-4, atol=1e-5)
    files = list((tmp_path / name).glob("widget-*.npz"))
    assert len(files) == 1

    class NoText:  # a cached class never reaches the text tower again
        identity = tiny.identity

        def encode_text(self, *a, **k):
            raise AssertionError("recomputed")

    torch.testing.assert_close(text_embeddings(NoText(), "widget", name, cache_dir=tmp_path), text)
    other = text_embeddings(tiny, "brick", name, cache_dir=tmp_path)
    assert not torch.allclose(other, text)


def test_bad_prompt_requests_name_the_value(tiny):
    with pytest.raises(ValueError, match="no class name"):
        text_embeddings(tiny, "  ", "april_gan")
    with pytest.raises(ValueError, match="unknown prompt set 'clip'"):
        text_embeddings(tiny, "widget", "clip")


@pytest.mark.slow
def test_vit_l_text_tower_reference():
    bb = build_backbone("ViT-L-14-336", 518, pretrained=None, seed=0)
    text = text_embeddings(bb, "metal_nut", "april_gan")
    assert text.shape == (2, 768)
    torch.testing.assert_close(text.double(), _reference(bb, "metal_nut", PROMPT_SETS["april_gan"]), rtol=1e-4, atol=1e-5)
