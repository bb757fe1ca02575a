"""Tiny random Dream checkpoints for tests, and transformers' Qwen2 run bidirectionally as the reference.

The checkpoint writer works from the config values alone (tensor names and shapes of the Qwen2 layout, written with
`safetensors.torch.save_file`), so it shares no code with `softmask_ext.model`; the reference model is transformers'
own `Qwen2ForCausalLM`, loaded from the same tensors.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

TINY_CONFIG = {
    "architectures": ["DreamModel"],
    "model_type": "Dream",
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 96,
    "max_position_embeddings": 128,
    "max_window_layers": 3,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "sliding_window": None,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "use_cache": False,
    "vocab_size": 512,
    "mask_token_id": 511,
    "pad_token_id": 500,
    "eos_token_id": 500,
    "bos_token_id": 501,
}


def tiny_config(**overrides) -> dict:
    return {**TINY_CONFIG, **overrides}


def qwen2_tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen2/Dream checkpoint with its shape, from the config values."""
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    q_dim, kv_dim = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (q_dim, hidden),
                p + "self_attn.q_proj.bias": (q_dim,),
                p + "self_attn.k_proj.weight": (kv_dim, hidden),
                p + "self_attn.k_proj.bias": (kv_dim,),
                p + "self_attn.v_proj.weight": (kv_dim, hidden),
                p + "self_attn.v_proj.bias": (kv_dim,),
                p + "self_attn.o_proj.weight": (hidden, q_dim),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
            }
        )
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def random_tensors(cfg: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights large enough that attention is far from uniform; norm weights around 1."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in qwen2_tensor_shapes(cfg).items():
        t = torch.randn(shape, generator=gen) * (0.15 if len(shape) == 2 else 0.05)
        if name.endswith("norm.weight"):
            t = 1.0 + torch.randn(shape, generator=gen) * 0.1
        tensors[name] = t.to(dtype)
    return tensors


def write_checkpoint(path: str | os.PathLike, cfg: dict, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    """Write config.json and the tensors: model.safetensors, or `shards` files + model.safetensors.index.json."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(shards):
        file_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, os.path.join(path, file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def make_checkpoint(
    path: str | os.PathLike, shards: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = tiny_config(**overrides)
    tensors = random_tensors(cfg, seed=seed, dtype=dtype)
    write_checkpoint(path, cfg, tensors, shards=shards)
    return cfg, tensors


def transformers_reference(cfg: dict, tensors: dict[str, torch.Tensor]) -> Qwen2ForCausalLM:
    """transformers' Qwen2 with the same weights, eager attention (its own softmax, not SDPA)."""
    hf_cfg = Qwen2Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"],
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        pad_token_id=cfg["pad_token_id"],
        attn_implementation="eager",
    )
    model = Qwen2ForCausalLM(hf_cfg).eval()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.to(next(iter(tensors.values())).dtype)


@torch.no_grad()
def bidirectional_logits(model: Qwen2ForCausalLM, input_ids=None, inputs_embeds=None, attention_mask=None):
    """Run transformers' Qwen2 without its causal mask, Dream-style.

    Qwen2Model.forward uses an attention-mask *dict* as given (one mask per layer type) instead of building a causal
    mask, so we hand it a full additive [B, 1, T, T] mask that blocks only padded keys. Positions follow Dream's
    `diffusion_generate`: cumsum(mask) - 1, padded positions filled with 1.
    """
    x = input_ids if input_ids is not None else inputs_embeds
    B, T = x.shape[:2]
    dtype = model.dtype
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long)
    keep = attention_mask.bool()
    additive = torch.zeros(B, 1, T, T, dtype=dtype).masked_fill(~keep[:, None, None, :], torch.finfo(dtype).min)
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(~keep, 1)
    return model(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        position_ids=positions,
        attention_mask={"full_attention": additive},
    ).logits
