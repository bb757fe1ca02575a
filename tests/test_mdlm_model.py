"""The MDLM family: DiT forward against MDLM's published model, SUBS invariants, the checkpoint layout round trip,
clear errors for a checkpoint that does not match, and the family registry."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _mdlm_oracle import dit_logits
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from tiny_mdlm import TINY_CONFIG, layout, write_checkpoint

from softmask_ext.model.family import family_of, load_model
from softmask_ext.model.mdlm import NEG_INFINITY, MDLMConfig, MDLMModel, subs_log_probs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mdlm"))
    write_checkpoint(path)
    return path


def test_loads_public_layout_and_matches_mdlm_dit(checkpoint):
    model = load_model(checkpoint)
    assert isinstance(model, MDLMModel) and family_of(model).logit_shift == 0 and family_of(model).name == "mdlm"
    assert model.config.mask_token_id == TINY_CONFIG["vocab_size"] - 1
    x = torch.randint(0, 39, (2, 24))
    x[:, ::3] = model.config.mask_token_id
    with safe_open(os.path.join(checkpoint, "model.safetensors"), "pt") as f:
        state = {n: f.get_tensor(n) for n in f.keys()}
    expected = dit_logits(state, model.config, x=x)
    got = model(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    # the same through inputs_embeds, and for chosen rows only
    embeds = model.get_input_embeddings()(x)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, got)
    rows = torch.tensor([[0, 5], [7, 23]])
    torch.testing.assert_close(
        model(input_ids=x, logits_rows=rows).logits, got.gather(1, rows[:, :, None].expand(2, 2, got.shape[-1]))
    )


def test_round_trip_keeps_names_config_and_values(checkpoint, tmp_path):
    model = load_model(checkpoint)
    model.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names == set(layout(TINY_CONFIG)) - {"backbone.rotary_emb.inv_freq"}
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "mdlm" and {k: raw[k] for k in ("hidden_dim", "cond_dim", "n_blocks", "n_heads")} == {
        k: TINY_CONFIG[k] for k in ("hidden_dim", "cond_dim", "n_blocks", "n_heads")
    }
    again = load_model(tmp_path, dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(t1.bfloat16(), t2)


def test_bad_layout_lists_every_problem_in_one_error(tmp_path):
    write_checkpoint(
        str(tmp_path),
        drop=("backbone.blocks.1.attn_out.weight",),
        extra={"backbone.lm_head.weight": (40, 32)},
        reshape={"backbone.blocks.0.mlp.0.weight": (64, 32)},
    )
    with open(tmp_path / "tokenizer.json", "w") as f:
        json.dump(
            {
                "version": "1.0",
                "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(30)}, "unk_token": "t0"},
            },
            f,
        )
    with pytest.raises(ValueError) as info:
        load_model(tmp_path)
    message = str(info.value)
    for part in (
        "missing tensors: backbone.blocks.1.attn_out.weight",
        "unexpected tensors: backbone.lm_head.weight",
        "backbone.blocks.0.mlp.0.weight: file [64, 32]",
        "the tokenizer has 30 ids",
    ):
        assert part in message


def test_unsupported_config_is_refused(tmp_path):
    write_checkpoint(str(tmp_path), cfg={**TINY_CONFIG, "parameterization": "sedd"})
    with pytest.raises(ValueError, match="parameterization='sedd'"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="n_heads"):
        MDLMConfig(hidden_dim=30, n_heads=4)


def test_length_beyond_the_model_is_an_error(checkpoint):
    model = load_model(checkpoint)
    with pytest.raises(ValueError, match="exceeds the model's length 24"):
        model(input_ids=torch.zeros(1, 25, dtype=torch.long))


@given(seed=st.integers(0, 2**31 - 1), masked_share=st.floats(0, 1))
def test_subs_invariants(seed, masked_share):
    g = torch.Generator().manual_seed(seed)
    vocab, mask = 12, 11
    logits = torch.randn(3, 7, vocab, generator=g) * 5
    logits[..., mask] += NEG_INFINITY
    x = torch.randint(0, mask, (3, 7), generator=g)
    masked = torch.rand(3, 7, generator=g) < masked_share
    x[masked] = mask
    log_p = subs_log_probs(logits, x, mask)
    p = log_p.exp()
    assert torch.all(p[..., mask] == 0)  # the mask class never gets mass
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 7))
    kept = ~masked
    assert torch.all(log_p[kept].gather(-1, x[kept][:, None]) == 0)  # carried over ...
    assert torch.all(log_p[kept].max(-1).values == 0) and torch.all(p[kept].sum(-1) == 1)  # ... as a one-hot
    torch.testing.assert_close(log_p[masked], torch.log_softmax(logits[masked], -1))


def test_model_masks_the_mask_class_and_initialises_as_mdlm():
    model = MDLMModel(MDLMConfig(vocab_size=20, model_length=8, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2))
    logits = model(input_ids=torch.randint(0, 20, (2, 8))).logits
    assert torch.all(logits[..., 19] == NEG_INFINITY)  # zero-initialised head: exactly the offset
    assert torch.all(logits[..., :19] == 0)
    assert model.backbone.blocks[0].adaLN_modulation.weight.abs().sum() == 0
