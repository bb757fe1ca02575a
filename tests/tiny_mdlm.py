"""Tiny random MDLM checkpoints in the public layout (``kuleshov-group/mdlm-owt``), written from the config values
alone (tensor names and shapes listed here, saved with ``safetensors.torch.save_file``), so the writer shares no code
with ``softmask_ext.model.mdlm``."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

# The Hugging Face wrapper's config.json keys (plus its remote-code entries, which must be ignored).
TINY_CONFIG = {
    "architectures": ["MDLM"],
    "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig", "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
    "model_type": "mdlm",
    "vocab_size": 40,
    "model_length": 24,
    "hidden_dim": 32,
    "cond_dim": 16,
    "n_blocks": 2,
    "n_heads": 4,
    "dropout": 0.1,
    "time_conditioning": False,
    "return_dict": False,
    "torch_dtype": "float32",
    "transformers_version": "4.38.2",
}


def layout(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the public checkpoint layout (with the rotary buffer it stores)."""
    d, c, v = cfg["hidden_dim"], cfg["cond_dim"], cfg["vocab_size"]
    shapes = {
        "backbone.vocab_embed.embedding": (v, d),
        "backbone.sigma_map.mlp.0.weight": (c, 256),
        "backbone.sigma_map.mlp.0.bias": (c,),
        "backbone.sigma_map.mlp.2.weight": (c, c),
        "backbone.sigma_map.mlp.2.bias": (c,),
        "backbone.rotary_emb.inv_freq": (d // cfg["n_heads"] // 2,),
        "backbone.output_layer.norm_final.weight": (d,),
        "backbone.output_layer.linear.weight": (v, d),
        "backbone.output_layer.linear.bias": (v,),
        "backbone.output_layer.adaLN_modulation.weight": (2 * d, c),
        "backbone.output_layer.adaLN_modulation.bias": (2 * d,),
    }
    for i in range(cfg["n_blocks"]):
        p = f"backbone.blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (d,),
                p + "attn_qkv.weight": (3 * d, d),
                p + "attn_out.weight": (d, d),
                p + "norm2.weight": (d,),
                p + "mlp.0.weight": (4 * d, d),
                p + "mlp.0.bias": (4 * d,),
                p + "mlp.2.weight": (d, 4 * d),
                p + "mlp.2.bias": (d,),
                p + "adaLN_modulation.weight": (6 * d, c),
                p + "adaLN_modulation.bias": (6 * d,),
            }
        )
    return shapes


def write_checkpoint(
    path: str,
    cfg: dict | None = None,
    seed: int = 0,
    std: float = 0.2,
    drop: tuple[str, ...] = (),
    extra: dict[str, tuple[int, ...]] | None = None,
    reshape: dict[str, tuple[int, ...]] | None = None,
) -> dict:
    """A random checkpoint (all tensors nonzero, so adaLN and the head matter); ``drop``/``extra``/``reshape`` break
    the layout on purpose. Returns the config written."""
    cfg = dict(TINY_CONFIG if cfg is None else cfg)
    g = torch.Generator().manual_seed(seed)
    shapes = {**layout(cfg), **(extra or {}), **(reshape or {})}
    tensors = {name: torch.randn(shape, generator=g) * std for name, shape in shapes.items() if name not in drop}
    for name, tensor in tensors.items():
        if name.endswith(("norm1.weight", "norm2.weight", "norm_final.weight")):
            tensors[name] = 1 + tensor
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return cfg
