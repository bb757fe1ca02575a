"""Tiny random LLaDA checkpoints for tests, the same model built in memory, and transformers' Llama run
bidirectionally as the reference.

The checkpoint writer works from LLaDA's config values alone (its `config.json` keys, tensor names and shapes,
written with `safetensors.torch.save_file`), so it shares no code with `softmask_ext.model`; the reference model is
transformers' own `LlamaForCausalLM`, loaded from the same tensors renamed to Llama's layout (LLaDA's gated `ff_proj`
is Llama's `gate_proj`).
"""

from __future__ import annotations

import os
import shutil

import torch
from tiny_dream import write_checkpoint
from transformers import LlamaConfig, LlamaForCausalLM

from softmask_ext.model import LLaDAConfig, LLaDAModel, load_tokenizer

# LLaDA-8B's config.json layout (OLMo field names), shrunk.
TINY_CONFIG = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 64,
    "embedding_dropout": 0.0,
    "embedding_size": 512,
    "eos_token_id": 500,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 511,
    "max_sequence_length": 128,
    "mlp_hidden_size": 96,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 4,
    "n_kv_heads": 4,
    "n_layers": 3,
    "pad_token_id": 500,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "torch_dtype": "float32",
    "use_cache": False,
    "vocab_size": 512,
    "weight_tying": False,
}
# Llama's name for each of LLaDA's per-block tensors.
LLAMA_NAMES = {
    "attn_norm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_norm": "post_attention_layernorm",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}


def tiny_config(**overrides) -> dict:
    return {**TINY_CONFIG, **overrides}


def llada_tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a LLaDA checkpoint with its shape, from the config values."""
    hidden, inner, vocab = cfg["d_model"], cfg["mlp_hidden_size"], cfg["embedding_size"] or cfg["vocab_size"]
    head_dim = hidden // cfg["n_heads"]
    kv_dim = (cfg["n_kv_heads"] or cfg["n_heads"]) * head_dim
    shapes = {"model.transformer.wte.weight": (vocab, hidden), "model.transformer.ln_f.weight": (hidden,)}
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        shapes.update(
            {
                p + "attn_norm.weight": (hidden,),
                p + "ff_norm.weight": (hidden,),
                p + "q_proj.weight": (hidden, hidden),
                p + "k_proj.weight": (kv_dim, hidden),
                p + "v_proj.weight": (kv_dim, hidden),
                p + "attn_out.weight": (hidden, hidden),
                p + "ff_proj.weight": (inner, hidden),
                p + "up_proj.weight": (inner, hidden),
                p + "ff_out.weight": (hidden, inner),
            }
        )
        if cfg.get("include_qkv_bias"):
            shapes.update({p + "q_proj.bias": (hidden,), p + "k_proj.bias": (kv_dim,), p + "v_proj.bias": (kv_dim,)})
    if not cfg.get("weight_tying", False):
        shapes["model.transformer.ff_out.weight"] = (vocab, hidden)
    return shapes


def random_tensors(
    cfg: dict, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.15
) -> dict[str, torch.Tensor]:
    """Random weights (matrices of standard deviation `std`) large enough that attention is far from uniform; norm
    weights around 1."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in llada_tensor_shapes(cfg).items():
        t = torch.randn(shape, generator=gen) * (std if len(shape) == 2 else 0.05)
        if name.endswith(("norm.weight", "ln_f.weight")):
            t = 1.0 + torch.randn(shape, generator=gen) * 0.1
        tensors[name] = t.to(dtype)
    return tensors


def make_checkpoint(
    path: str | os.PathLike, shards: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = tiny_config(**overrides)
    tensors = random_tensors(cfg, seed=seed, dtype=dtype)
    write_checkpoint(path, cfg, tensors, shards=shards)
    return cfg, tensors


def tiny_model(seed: int = 0, **overrides) -> LLaDAModel:
    """A tiny random `LLaDAModel` without files: a checkpoint's config and tensors, loaded by LLaDA's names."""
    cfg = tiny_config(**overrides)
    model = LLaDAModel(LLaDAConfig.from_dict(cfg)).eval()
    # Weights three times make_checkpoint's: confident, distinct predictions (maxima from 0.1 to 0.9, no near-ties),
    # so that confidence thresholds and rankings are exercised.
    model.load_state_dict(random_tensors(cfg, seed=seed, std=0.45))
    return model


def make_checkpoint_with_tokenizer(
    path: str | os.PathLike, tokenizer_dir: str | os.PathLike, seed: int = 0, **overrides
) -> dict:
    """A tiny LLaDA checkpoint that ships the tokenizer files of `tokenizer_dir` (copied in), with the tokenizer's
    mask, pad and eos ids in config.json."""
    tokenizer = load_tokenizer(tokenizer_dir)
    assert len(tokenizer) <= TINY_CONFIG["embedding_size"]
    cfg, _ = make_checkpoint(
        path,
        seed=seed,
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    for name in os.listdir(tokenizer_dir):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(path, name))
    return cfg


def llama_reference(cfg: dict, tensors: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """transformers' Llama with the same weights (renamed), eager attention (its own softmax, not SDPA)."""
    hf_cfg = LlamaConfig(
        vocab_size=cfg["embedding_size"],
        hidden_size=cfg["d_model"],
        intermediate_size=cfg["mlp_hidden_size"],
        num_hidden_layers=cfg["n_layers"],
        num_attention_heads=cfg["n_heads"],
        num_key_value_heads=cfg["n_kv_heads"],
        max_position_embeddings=cfg["max_sequence_length"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"],
        tie_word_embeddings=cfg["weight_tying"],
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="eager",
    )
    renamed = {}
    for name, tensor in tensors.items():
        if name == "model.transformer.wte.weight":
            renamed["model.embed_tokens.weight"] = tensor
        elif name == "model.transformer.ln_f.weight":
            renamed["model.norm.weight"] = tensor
        elif name == "model.transformer.ff_out.weight":
            renamed["lm_head.weight"] = tensor
        else:
            _, _, _, layer, module, kind = name.split(".")
            renamed[f"model.layers.{layer}.{LLAMA_NAMES[module]}.{kind}"] = tensor
    model = LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if cfg["weight_tying"]:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(next(iter(tensors.values())).dtype)


@torch.no_grad()
def bidirectional_logits(model: LlamaForCausalLM, input_ids=None, inputs_embeds=None, attention_mask=None):
    """Run transformers' Llama without its causal mask: a prepared 4-D additive mask [B, 1, T, T] that blocks only
    padded keys is used as given. Positions are cumsum(mask) - 1 (the library's left-padding convention)."""
    x = input_ids if input_ids is not None else inputs_embeds
    B, T = x.shape[:2]
    dtype = model.dtype
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long)
    keep = attention_mask.bool()
    additive = torch.zeros(B, 1, T, T, dtype=dtype).masked_fill(~keep[:, None, None, :], torch.finfo(dtype).min)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return model(
        input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=positions, attention_mask=additive
    ).logits
