"""SeaS training on the tiny random Stable Diffusion: what it reads out of the U-Net, what it updates, what it
stores, and that the same seed gives the same model."""

from __future__ import annotations

import json

import pytest
import torch

from anorefiner.seas.data import select_training_set
from anorefiner.seas.sd import (BlockOutputs, CrossAttentionMaps, Tokens, add_tokens, feature_channels, load_base,
                                positions, token_ids, unet_features)
from anorefiner.seas.train import finetune_generation, train_mask_head, train_seas

from .conftest import tiny_seas_config


@pytest.fixture()
def comp(tiny_sd):
    return load_base(tiny_sd)


def _inputs(comp, prompts):
    torch.manual_seed(0)
    ids = token_ids(comp.tokenizer, prompts)
    return torch.randn(len(prompts), 4, 16, 16), torch.tensor([10, 900][: len(prompts)]), comp.text_encoder(ids)[0]


def test_placeholder_tokens_start_as_object_and_defect(comp):
    tokens = Tokens.make(3, 1, 4)
    assert tokens.prompt(1) == "a ob1 with sks5 sks6 sks7 sks8" and tokens.normal_prompt() == "a ob1"
    ids = add_tokens(comp, tokens)
    weight = comp.text_encoder.get_input_embeddings().weight
    obj, defect = (comp.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("object", "defect"))
    assert torch.equal(weight[ids[0]], weight[obj])
    assert all(torch.equal(weight[i], weight[defect]) for i in ids[1:])
    row = token_ids(comp.tokenizer, [tokens.prompt(0)])
    # "<bos> a ob1 with sks1..sks4": the positions the official code indexes (seas.py L92-L93)
    assert positions(row, ids[:1])[0].nonzero().ravel().tolist() == [2]
    assert positions(row, ids[1:])[0].nonzero().ravel().tolist() == [4, 5, 6, 7]
    third = token_ids(comp.tokenizer, [tokens.prompt(2)])[0, 4:8].tolist()
    assert third == ids[9:13]  # "sks10" is its own token, not "sks1" + "0"
    with pytest.raises(ValueError, match="already holds"):
        add_tokens(comp, tokens)


def test_recorded_cross_attention_leaves_the_unet_output_unchanged(comp):
    add_tokens(comp, Tokens.make(1, 1, 4))
    x, t, enc = _inputs(comp, ["a ob1 with sks1 sks2 sks3 sks4", "a ob1"])
    with torch.no_grad():
        plain = comp.unet(x, t, enc).sample
        maps = CrossAttentionMaps(comp.unet, (2, 4))
        recorded = comp.unet(x, t, enc).sample
    torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-6)
    out = maps.maps(16)
    assert set(out) == {2, 4} and out[2].shape == (2, 8, 8, 16) and out[4].shape == (2, 4, 4, 16)
    # probabilities over the 16 prompt tokens, averaged over modules and heads, still sum to one
    torch.testing.assert_close(out[2].sum(-1), torch.ones(2, 8, 8))
    maps.release()
    with pytest.raises(ValueError, match="latent/8"):
        CrossAttentionMaps(comp.unet, (8,))  # SD's fourth down block has no cross-attention


def test_block_outputs_are_the_features_the_mask_head_reads(comp):
    x, t, enc = _inputs(comp, ["a"])
    up = BlockOutputs([comp.unet.up_blocks[i] for i in unet_features(comp.unet)])
    dec = BlockOutputs(list(comp.vae.decoder.up_blocks)[:-1])
    with torch.no_grad():
        comp.unet(x, t, enc)
        comp.vae.decode(x)
    (low_c, mid_c), vae_c = feature_channels(comp.unet, comp.vae)
    assert up.outputs[0].shape == (1, low_c, 8, 8) and up.outputs[1].shape == (1, mid_c, 16, 16)
    assert [o.shape[1:] for o in dec.outputs] == [(vae_c[0], 32, 32)]
    up.release()
    dec.release()


def test_finetuning_updates_the_unet_and_the_token_embeddings(comp, demo_dataset):
    cfg = tiny_seas_config(steps_per_defect_type=1)
    data = select_training_set(demo_dataset, "widget", "demo", num_normal=4)
    tokens = Tokens.make(len(data.defect_types), 1, 4)
    ids = add_tokens(comp, tokens)
    unet0 = {k: v.clone() for k, v in comp.unet.state_dict().items()}
    emb0 = comp.text_encoder.get_input_embeddings().weight.detach().clone()
    fc1 = next(p for n, p in comp.text_encoder.named_parameters() if n.endswith("layers.0.mlp.fc1.weight"))
    frozen0 = fc1.detach().clone()
    history = finetune_generation(comp, tokens, ids, data, cfg, "cpu")
    steps = len(data.defect_types)  # 1 step per defect type
    assert len(history) == steps and set(history[0]) == {"mse", "da", "na"}
    assert all(v > 0 for h in history for v in h.values())
    assert sum(not torch.equal(v, comp.unet.state_dict()[k]) for k, v in unet0.items()) > len(unet0) // 2
    emb = comp.text_encoder.get_input_embeddings().weight.detach()
    assert not torch.allclose(emb[ids], emb0[ids])
    # the whole matrix trains (seas.py L254-L258): rows of tokens in no prompt get no gradient and only feel AdamW's
    # decoupled weight decay, w <- w (1 - lr wd) per step
    prompts = [tokens.prompt(k) for k in range(4)] + [tokens.normal_prompt()]
    used = set(token_ids(comp.tokenizer, prompts).ravel().tolist())
    others = [i for i in range(len(emb)) if i not in used]
    assert len(others) > len(emb) // 2
    decay = (1 - cfg.encoder_learning_rate * cfg.adam_weight_decay) ** steps
    torch.testing.assert_close(emb[others], emb0[others] * decay)
    assert torch.equal(fc1, frozen0)  # the encoder layers are frozen


def test_the_mask_head_trains_on_frozen_models(comp, demo_dataset):
    cfg = tiny_seas_config(steps_per_defect_type=1)
    data = select_training_set(demo_dataset, "widget", "demo", num_normal=4)
    tokens = Tokens.make(len(data.defect_types), 1, 4)
    add_tokens(comp, tokens)
    unet0 = [p.clone() for p in comp.unet.parameters()]
    rmp, history = train_mask_head(comp, tokens, data, cfg, "cpu")
    assert len(history) == len(data.defect_types) and all(0 < h["focal"] < 10 for h in history)
    assert all(torch.equal(a, b) for a, b in zip(unet0, comp.unet.parameters()))
    assert not rmp.training and not any(p.requires_grad for p in comp.unet.parameters())


def test_trained_model_folder_and_same_seed_same_model(seas_model, tiny_sd, demo_dataset, tmp_path):
    from safetensors.torch import load_file

    manifest = json.loads((seas_model / "manifest.json").read_text())
    assert manifest["format"] == "anorefiner-seas/1" and manifest["base"]["path"] == str(tiny_sd)
    assert manifest["tokens"]["normal"] == ["ob1"] and len(manifest["tokens"]["anomaly"]) == 4
    assert len(manifest["history"]["generation"]) == 4 and len(manifest["history"]["mask"]) == 4
    files = {p.name for p in seas_model.iterdir()}
    assert {"unet", "token_embedding.safetensors", "rmp.safetensors", "manifest.json"} <= files
    assert not (seas_model.parent / (seas_model.name + ".partial")).exists()
    again = train_seas(demo_dataset, "demo", "widget", tiny_sd, tiny_seas_config(), tmp_path / "again")
    for name in ("token_embedding.safetensors", "rmp.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(seas_model / name)), load_file(str(again / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    other = train_seas(demo_dataset, "demo", "widget", tiny_sd, tiny_seas_config(seed=1), tmp_path / "other")
    a, b = load_file(str(seas_model / "rmp.safetensors")), load_file(str(other / "rmp.safetensors"))
    assert not all(torch.equal(a[k], b[k]) for k in a)
