"""The block-by-block CLIP forwards with hooks equal open_clip's own forwards when no hook changes anything."""

from __future__ import annotations

import pytest
import torch

from anorefiner.backbones import build_backbone
from anorefiner.backbones.clip_prompting import (encode_text_embeddings, eot_index, token_embeddings, tokenize,
                                                 visual_forward)


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return build_backbone(tiny_clip, 56, pretrained=None, seed=3)


def test_text_forward_without_hooks_is_open_clips_encode_text(clip):
    tokens = tokenize(clip, ["a photo of a damaged object", "flawless tile"])
    ours = encode_text_embeddings(clip, token_embeddings(clip, tokens), eot_index(tokens), normalize=True)
    with torch.no_grad():
        ref = clip.model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_text_hook_sees_every_block_and_changes_the_output(clip):
    tokens = tokenize(clip, ["a photo of a good object"])
    seen = []

    def hook(i, x):
        seen.append(i)
        x = x.clone()
        x[:, 1] = 0.0 if i == 2 else x[:, 1]
        return x

    out = encode_text_embeddings(clip, token_embeddings(clip, tokens), eot_index(tokens), before_block=hook)
    assert seen == list(range(1, len(clip.model.transformer.resblocks) + 1))
    plain = encode_text_embeddings(clip, token_embeddings(clip, tokens), eot_index(tokens))
    assert not torch.allclose(out, plain)


def test_prompt_gradients_flow_through_the_frozen_text_tower(clip):
    tokens = tokenize(clip, ["a photo of a good object"])
    prompt = torch.zeros(1, 1, token_embeddings(clip, tokens).shape[-1], requires_grad=True)

    def hook(i, x):
        return torch.cat([x[:, :1], x[:, 1:2] + prompt, x[:, 2:]], dim=1) if i == 1 else x

    out = encode_text_embeddings(clip, token_embeddings(clip, tokens), eot_index(tokens), before_block=hook)
    out.sum().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.model.parameters())


def test_visual_forward_without_hooks_matches_the_cached_features(clip):
    batch = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    layers, cls = clip.forward(batch)
    blocks = tuple(int(k) for k in clip.layers)
    out, last = visual_forward(clip, batch, blocks=blocks)
    assert sorted(out) == sorted(blocks)
    for k in clip.layers:
        ours = out[int(k)][:, 1:].reshape(layers[k].shape)
        torch.testing.assert_close(ours, layers[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(last[:, 0], cls, rtol=0, atol=1e-6)


def test_visual_hook_can_append_prompt_tokens(clip):
    batch = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    extra = torch.zeros(1, 5, clip.width)

    def hook(i, x):
        return torch.cat([x, extra], dim=1) if i == 1 else x

    out, last = visual_forward(clip, batch, before_block=hook, blocks=(2,))
    assert last.shape[1] == 1 + 16 + 5 and out[2].shape[1] == 1 + 16 + 5
