"""LLaDAModel: loading LLaDA checkpoints, parity with transformers' Llama run bidirectionally, save round trip,
logits rows, gradient checkpointing, PEFT adapters on its modules, and clear errors for bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_dream import write_checkpoint
from tiny_llada import (
    bidirectional_logits,
    llama_reference,
    make_checkpoint,
    make_checkpoint_with_tokenizer,
    random_tensors,
    tiny_config,
)

import softmask_ext
from softmask_ext.model import DreamModel, LLaDAConfig, LLaDAModel, family_of, load_model
from softmask_ext.model.tokenizer import load_tokenizer

VOCAB, PAD, MASK = 512, 500, 511


def left_pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s) :] = s
        mask[b, T - len(s) :] = 1
    return ids, mask


@pytest.mark.parametrize("shards, tied, gqa", [(1, False, False), (3, False, True), (1, True, False)])
def test_logits_match_transformers_llama_bidirectional(tmp_path, shards, tied, gqa):
    cfg, tensors = make_checkpoint(tmp_path, shards=shards, weight_tying=tied, n_kv_heads=2 if gqa else 4)
    model = load_model(tmp_path)
    assert isinstance(model, LLaDAModel) and not model.training and model.dtype == torch.float32
    reference = llama_reference(cfg, tensors)
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, bidirectional_logits(reference, ids), rtol=1e-5, atol=1e-5)
        embeds = model.get_input_embeddings()(ids)
        torch.testing.assert_close(
            model(inputs_embeds=embeds).logits,
            bidirectional_logits(reference, inputs_embeds=embeds),
            rtol=1e-5,
            atol=1e-5,
        )
        padded, mask = left_pad([torch.randint(0, VOCAB, (n,)) for n in (9, 4, 7)])
        got = model(padded, attention_mask=mask).logits
        want = bidirectional_logits(reference, padded, attention_mask=mask)
        keep = mask.bool()
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)


def test_reference_is_really_bidirectional(tmp_path):
    cfg, tensors = make_checkpoint(tmp_path)
    reference = llama_reference(cfg, tensors)
    ids = torch.randint(0, VOCAB - 1, (1, 6))
    changed = ids.clone()
    changed[0, -1] += 1
    assert not torch.allclose(
        bidirectional_logits(reference, ids)[0, 0], bidirectional_logits(reference, changed)[0, 0]
    )


def test_ff_proj_is_the_gated_projection(tmp_path):
    """Swapping LLaDA's ff_proj and up_proj changes the output: the loader keeps LLaDA's SwiGLU order."""
    cfg, tensors = make_checkpoint(tmp_path / "a")
    swapped = dict(tensors)
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        swapped[p + "ff_proj.weight"], swapped[p + "up_proj.weight"] = (
            tensors[p + "up_proj.weight"],
            tensors[p + "ff_proj.weight"],
        )
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        want = bidirectional_logits(llama_reference(cfg, tensors), ids)
        assert not torch.allclose(bidirectional_logits(llama_reference(cfg, swapped), ids), want, atol=1e-3)
        torch.testing.assert_close(load_model(tmp_path / "a")(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_family_and_exports(tmp_path):
    make_checkpoint(tmp_path)
    model = softmask_ext.load_model(tmp_path)
    family = family_of(model)
    assert family.name == "llada" and family.logit_shift == 0 and family is LLaDAModel.family
    assert softmask_ext.LLaDAModel is LLaDAModel
    assert model.config.mask_token_id == MASK and model.config.pad_token_id == PAD
    assert LLaDAConfig().mask_token_id == 126336 and LLaDAConfig().vocab_size == 126464


def test_config_defaults_are_llada_8b():
    config = LLaDAConfig()
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
        config.rms_norm_eps,
        config.rope_theta,
        config.qkv_bias,
        config.tie_word_embeddings,
    ) == (4096, 32, 32, 32, 12288, 1e-5, 500000.0, False, False)


def test_save_round_trip_keeps_llada_layout(tmp_path):
    cfg, tensors = make_checkpoint(tmp_path / "src", shards=2)
    model = load_model(tmp_path / "src")
    model.save_pretrained(tmp_path / "out", max_shard_size="60KB")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == "llada" and saved["d_model"] == cfg["d_model"] and saved["weight_tying"] is False
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    again = LLaDAModel.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_tied_checkpoint_shares_the_table(tmp_path):
    make_checkpoint(tmp_path / "src", weight_tying=True)
    model = load_model(tmp_path / "src")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert "model.transformer.ff_out.weight" not in set(f.keys())
    assert load_model(tmp_path / "out").config.tie_word_embeddings


@torch.no_grad()
def test_logits_rows_select_the_same_rows(tmp_path):
    make_checkpoint(tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 7))
    full = model(ids).logits
    rows = torch.tensor([[0, 3, 6], [1, 1, 5]])
    torch.testing.assert_close(
        model(ids, logits_rows=rows).logits, full.gather(1, rows[..., None].expand(-1, -1, VOCAB))
    )
    flat = torch.tensor([0, 8, 13])
    torch.testing.assert_close(model(ids, logits_rows=flat).logits, full.reshape(14, VOCAB)[flat])


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    make_checkpoint(tmp_path)
    model = load_model(tmp_path).train()
    ids = torch.randint(0, VOCAB, (2, 6))

    def grads():
        model.zero_grad()
        model(ids).logits.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_peft_adapters_on_llada_modules_train_merge_and_reload(tmp_path, use_dora):
    from peft import LoraConfig, get_peft_model

    make_checkpoint(tmp_path / "base")
    model = load_model(tmp_path / "base")
    targets = list(LLaDAModel.family.adapter_targets)
    assert targets == ["q_proj", "k_proj", "v_proj", "attn_out"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora))
    adapted = {name.split(".")[-2] for name, _ in peft_model.named_modules() if name.endswith("lora_A")}
    assert adapted == set(targets)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, VOCAB, (2, 6))
    for _ in range(2):
        opt.zero_grad()
        peft_model(input_ids=ids).logits.square().mean().backward()
        opt.step()
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "final")
    reloaded = load_model(tmp_path / "final")
    assert isinstance(reloaded, LLaDAModel)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # the forward is the shared one, compiled in test_model.py; this checks LLaDA's blocks
def test_compiles_fullgraph(tmp_path):
    make_checkpoint(tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
        )


# ---------------------------------------------------------------------------------------------- bad input
def test_error_lists_every_missing_extra_and_misshapen_tensor(tmp_path):
    cfg = tiny_config()
    tensors = random_tensors(cfg)
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    del tensors["model.transformer.ln_f.weight"]
    tensors["model.transformer.blocks.0.extra.weight"] = torch.zeros(2)
    tensors["model.transformer.blocks.2.attn_out.weight"] = torch.zeros(64, 32)
    write_checkpoint(tmp_path, cfg, tensors)
    with pytest.raises(ValueError) as info:
        load_model(tmp_path)
    message = str(info.value)
    for expected in (
        "blocks.1.up_proj.weight",
        "transformer.ln_f.weight",
        "blocks.0.extra.weight",
        "blocks.2.attn_out.weight: file [64, 32] vs model [64, 64]",
    ):
        assert expected in message


@pytest.mark.parametrize(
    "override, match",
    [
        ({"block_type": "sequential"}, "block_type='sequential'"),
        ({"alibi": True, "rope": False}, "alibi=True"),
        ({"include_bias": True}, "include_bias=True"),
        ({"layer_norm_type": "default"}, "layer_norm_type='default'"),
        ({"scale_logits": True}, "scale_logits=True"),
        ({"mask_token_id": 9999}, "mask_token_id must be a token id"),
        ({"n_kv_heads": 3}, "multiple of num_key_value_heads"),
        ({"multi_query_attention": True}, "contradicts multi_query_attention"),
    ],
)
def test_unsupported_llada_config_is_a_clear_error(tmp_path, override, match):
    config = tiny_config(**override)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        LLaDAConfig.from_pretrained(tmp_path)


def test_unknown_model_type_lists_the_families(tmp_path):
    make_checkpoint(tmp_path, model_type="gpt_neox")
    with pytest.raises(ValueError, match=r"no model family handles model_type 'gpt_neox'; supported: dream .*llada"):
        load_model(tmp_path)


def test_family_configs_are_not_interchangeable():
    with pytest.raises(TypeError, match="LLaDAConfig"):
        LLaDAModel(DreamModel.config_class())
    with pytest.raises(TypeError, match="DreamConfig"):
        DreamModel(LLaDAConfig())
    with pytest.raises(ValueError, match="model_type 'Dream' is not supported"):
        LLaDAConfig.from_dict({"model_type": "Dream"})
    with pytest.raises(ValueError, match="model_type 'llada' is not supported"):
        DreamModel.config_class.from_dict({"model_type": "llada"})


def test_tokenizer_of_a_tiny_llada_checkpoint(tmp_path):
    from softmask_ext.finetune import SHIPPED_MODEL

    cfg = make_checkpoint_with_tokenizer(tmp_path, SHIPPED_MODEL)
    tokenizer = load_tokenizer(tmp_path)
    model = load_model(tmp_path)
    assert tokenizer.mask_token_id == model.config.mask_token_id == cfg["mask_token_id"]
    assert tokenizer.pad_token_id == model.config.pad_token_id
