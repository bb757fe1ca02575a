"""Checkpoint loading/saving, parity with transformers' Qwen2 run bidirectionally, tokenizer loading."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_dream import (
    bidirectional_logits,
    make_checkpoint,
    random_tensors,
    tiny_config,
    transformers_reference,
    write_checkpoint,
)

from softmask_ext.model import DreamConfig, DreamModel, load_tokenizer

ATOL = 2e-5


def _left_padded_batch(vocab: int, lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), 500, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n :] = torch.randint(0, vocab - 16, (n,), generator=gen)
        mask[b, T - n :] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_qwen2_bidirectional(tmp_path, shards, tied):
    cfg, tensors = make_checkpoint(tmp_path, shards=shards, tie_word_embeddings=tied)
    ours = DreamModel.from_pretrained(tmp_path)
    ref = transformers_reference(cfg, tensors)

    ids = torch.randint(0, cfg["vocab_size"], (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, bidirectional_logits(ref, input_ids=ids), atol=ATOL, rtol=0)

        embeds = torch.randn(2, 11, cfg["hidden_size"])
        torch.testing.assert_close(
            ours(inputs_embeds=embeds).logits, bidirectional_logits(ref, inputs_embeds=embeds), atol=ATOL, rtol=0
        )

        ids, mask = _left_padded_batch(cfg["vocab_size"], [13, 7, 1])
        got = ours(ids, attention_mask=mask).logits
        want = bidirectional_logits(ref, input_ids=ids, attention_mask=mask)
        keep = mask.bool()
        torch.testing.assert_close(got[keep], want[keep], atol=ATOL, rtol=0)


def test_bf16_is_as_accurate_as_transformers_bf16(tmp_path):
    cfg, tensors = make_checkpoint(tmp_path)
    ours = DreamModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ref_bf16 = transformers_reference(cfg, {n: t.bfloat16() for n, t in tensors.items()})
    ids = torch.randint(0, cfg["vocab_size"], (2, 17))
    exact = bidirectional_logits(transformers_reference(cfg, tensors), input_ids=ids)
    with torch.no_grad():
        our_error = (ours(ids).logits.float() - exact).abs().max()
    their_error = (bidirectional_logits(ref_bf16, input_ids=ids).float() - exact).abs().max()
    assert our_error <= 1.5 * their_error, (our_error, their_error)


def test_bidirectional_reference_is_really_not_causal(tmp_path):
    """Guard on the oracle itself: changing the last token must change the first position's logits."""
    cfg, tensors = make_checkpoint(tmp_path)
    ref = transformers_reference(cfg, tensors)
    ids = torch.randint(0, cfg["vocab_size"], (1, 9))
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 1) % cfg["vocab_size"]
    first = bidirectional_logits(ref, input_ids=ids)[0, 0]
    assert not torch.allclose(first, bidirectional_logits(ref, input_ids=other)[0, 0], atol=1e-4)


def test_plain_qwen2_config_with_transformers5_rope_parameters(tmp_path):
    raw = tiny_config(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    del raw["rope_theta"], raw["mask_token_id"]
    raw["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}
    raw["vocab_size"] = 151700  # the default mask id 151666 must fit
    tensors = random_tensors(raw)
    write_checkpoint(tmp_path, raw, tensors)
    model = DreamModel.from_pretrained(tmp_path)
    assert model.config.mask_token_id == 151666 and model.config.rope_theta == 10000.0
    ids = torch.randint(0, 1000, (1, 6))
    ref = transformers_reference({**raw, "rope_theta": 10000.0}, tensors)
    torch.testing.assert_close(model(ids).logits, bidirectional_logits(ref, input_ids=ids), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- dtype / device
def test_dtype_defaults_to_stored_and_converts_on_request(tmp_path):
    _, tensors = make_checkpoint(tmp_path, dtype=torch.bfloat16)
    as_stored = DreamModel.from_pretrained(tmp_path)
    assert as_stored.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in as_stored.parameters())
    as_fp32 = DreamModel.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    assert as_fp32.dtype == torch.float32 and as_fp32.device == torch.device("cpu")
    name = "model.layers.1.self_attn.k_proj.bias"
    assert torch.equal(as_fp32.state_dict()[name], tensors[name].float())
    assert torch.isfinite(as_stored(torch.randint(0, 512, (1, 5))).logits.float()).all()


def test_loaded_model_is_fully_materialised_in_eval_mode(tmp_path):
    make_checkpoint(tmp_path, tie_word_embeddings=True)
    model = DreamModel.from_pretrained(tmp_path)
    assert not model.training
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.requires_grad for p in model.parameters())


def test_meta_device_construction_allocates_nothing():
    with torch.device("meta"):
        model = DreamModel(
            DreamConfig(
                vocab_size=1000,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                mask_token_id=999,
                pad_token_id=0,
                eos_token_id=0,
                bos_token_id=0,
            )
        )
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_straight_onto_cuda(tmp_path):
    cfg, _ = make_checkpoint(tmp_path, shards=2)
    model = DreamModel.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    ids = torch.randint(0, cfg["vocab_size"], (2, 9))
    ref = DreamModel.from_pretrained(tmp_path)
    torch.testing.assert_close(model(ids.cuda()).logits.float().cpu(), ref(ids).logits, atol=0.15, rtol=0.05)


# ---------------------------------------------------------------------------------------------- saving
def test_save_pretrained_round_trip_single_and_sharded(tmp_path):
    make_checkpoint(tmp_path / "src")
    model = DreamModel.from_pretrained(tmp_path / "src")
    ids = torch.randint(0, 512, (2, 8))
    want = model(ids).logits

    model.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "Dream" and config["torch_dtype"] == "float32"
    torch.testing.assert_close(DreamModel.from_pretrained(tmp_path / "out")(ids).logits, want, atol=0, rtol=0)

    # Re-saving sharded into the same directory must replace the single file, not leave it beside the index.
    model.save_pretrained(tmp_path / "out", max_shard_size="40KB")
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert all(
        os.path.getsize(tmp_path / "out" / f) < 40_000 + 4_096 or len(load_file(tmp_path / "out" / f)) == 1
        for f in shards
    )
    torch.testing.assert_close(DreamModel.from_pretrained(tmp_path / "out")(ids).logits, want, atol=0, rtol=0)


def test_save_tied_model_omits_lm_head(tmp_path):
    make_checkpoint(tmp_path / "src", tie_word_embeddings=True)
    DreamModel.from_pretrained(tmp_path / "src").save_pretrained(tmp_path / "out")
    assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")


# ---------------------------------------------------------------------------------------------- bad checkpoints
def _error(path, match, exc=ValueError):
    with pytest.raises(exc, match=match):
        DreamModel.from_pretrained(path)


def test_error_missing_directory_and_files(tmp_path):
    _error(tmp_path / "nope", "does not exist", FileNotFoundError)
    _error(tmp_path, "no config.json", FileNotFoundError)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    _error(tmp_path, "no model.safetensors", FileNotFoundError)


def test_error_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    _error(tmp_path, "pickle.*pytorch_model.bin.*safetensors")


def test_error_lists_missing_unexpected_and_misshaped(tmp_path):
    cfg, tensors = make_checkpoint(tmp_path)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    write_checkpoint(tmp_path, cfg, tensors)
    with pytest.raises(ValueError) as err:
        DreamModel.from_pretrained(tmp_path)
    message = str(err.value)
    assert "missing tensors: model.layers.2.mlp.up_proj.weight" in message
    assert "unexpected tensors: model.layers.0.self_attn.o_proj.bias" in message
    assert "model.layers.1.self_attn.k_proj.weight: file [64, 64] vs model [32, 64]" in message


def test_error_index_names_absent_shard_or_tensor(tmp_path):
    make_checkpoint(tmp_path, shards=2)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    _error(tmp_path, "shard files that are not there.*model-00002-of-00002", FileNotFoundError)

    make_checkpoint(tmp_path / "b", shards=2)
    index_path = tmp_path / "b" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    _error(tmp_path / "b", "index names but no shard holds: model.extra.weight")


def test_error_bad_config_values(tmp_path):
    for overrides, match in [
        ({"model_type": "llama"}, "model_type 'llama' is not supported"),
        ({"use_sliding_window": True}, "sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'"),
        ({"num_key_value_heads": 3}, "multiple of"),
        ({"mask_token_id": 4096}, "mask_token_id must be a token id"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps(tiny_config(**overrides)))
        _error(tmp_path, match)
    (tmp_path / "config.json").write_text("{not json")
    _error(tmp_path, "not valid JSON")


def test_error_bad_dtype_and_stored_dtype(tmp_path):
    make_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        DreamModel.from_pretrained(tmp_path, dtype=torch.int8)
    _, tensors = make_checkpoint(tmp_path / "b")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].double()
    save_file(tensors, tmp_path / "b" / "model.safetensors")
    _error(tmp_path / "b", "unsupported dtype.*model.norm.weight")


def test_error_bad_shard_size(tmp_path):
    make_checkpoint(tmp_path)
    model = DreamModel.from_pretrained(tmp_path)
    for bad in ("lots", "-1GB", 0, "0MB"):
        with pytest.raises(ValueError, match="max_shard_size"):
            model.save_pretrained(tmp_path / "out", max_shard_size=bad)


# ---------------------------------------------------------------------------------------------- config
def test_config_round_trip_and_list_valued_eos(tmp_path):
    raw = tiny_config(eos_token_id=[500, 502])
    config = DreamConfig.from_dict(raw)
    assert config.eos_token_id == 500 and config.head_dim == 16 and config.qkv_bias
    config.save_pretrained(tmp_path)
    again = DreamConfig.from_pretrained(tmp_path)
    assert again == config and again.to_dict()["model_type"] == "Dream"
    assert config.to_dict()["rope_scaling"] is None and config.get("vocab_size") == 512


# ---------------------------------------------------------------------------------------------- tokenizer
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]


def _train_bpe(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["def add(a, b):\n    return a + b\n", "hello world, hello tokens"] * 20, trainer)
    return tok


def _write_tokenizer_config(path):
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "DreamTokenizer",  # remote code in the real checkpoint: must not be needed
                "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "mask_token": "<|mask|>",
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )


def test_tokenizer_from_tokenizer_json_with_chat_template(tmp_path):
    tok = _train_bpe(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    _write_tokenizer_config(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.mask_token_id == tok.token_to_id("<|mask|>")
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == tok.token_to_id("<|endoftext|>")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "add two numbers"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nadd two numbers<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tok.token_to_id("<|im_start|>") and tokenizer.decode(ids) == text


def test_tokenizer_from_vocab_and_merges(tmp_path):
    tok = _train_bpe(tmp_path)
    tok.model.save(str(tmp_path))  # vocab.json + merges.txt, as Dream ships them
    _write_tokenizer_config(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.decode(tokenizer("def add(a, b)")["input_ids"]) == "def add(a, b)"
    assert tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False
    ).endswith("<|im_start|>assistant\n")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="tokenizer.json, or vocab.json and merges.txt"):
        load_tokenizer(tmp_path)
