"""Configuration of a LLaDA model (LLaMA-style blocks, bidirectional attention, no logit shift).

Reads the `config.json` of a LLaDA checkpoint (`"model_type": "llada"`, GSAI-ML's LLaDA-8B Base/Instruct, LLaDA-1.5),
whose field names are OLMo's (`d_model`, `n_heads`, `n_kv_heads`, `n_layers`, `mlp_hidden_size`, `weight_tying`,
...), into the field names the shared transformer blocks read (`hidden_size`, `num_attention_heads`, ...), and writes
them back in LLaDA's names. Features of LLaDA's code that these checkpoints do not use (other block types, ALiBi,
LayerNorm instead of RMSNorm, biases on every linear layer, logit scaling, input-embedding scaling, q/k norms, block
groups) are refused with a clear error instead of being ignored. Dropout settings are not applied (the released
checkpoints set them to 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config import DTYPE_NAMES, ConfigFile
from .transformer import validate_transformer_config

SUPPORTED_MODEL_TYPES = ("llada", "LLaDA")
# LLaDA's config keys -> ours (the rest are derived or checked below).
_RENAMED = {
    "d_model": "hidden_size",
    "n_heads": "num_attention_heads",
    "n_layers": "num_hidden_layers",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "max_sequence_length": "max_position_embeddings",
    "weight_tying": "tie_word_embeddings",
    "include_qkv_bias": "qkv_bias",
    "mask_token_id": "mask_token_id",
    "pad_token_id": "pad_token_id",
    "eos_token_id": "eos_token_id",
    "bos_token_id": "bos_token_id",
}
# Settings our blocks implement, and the only value each may take.
_REQUIRED = {
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "rope": True,
    "alibi": False,
    "include_bias": False,
    "bias_for_layer_norm": None,
    "scale_logits": False,
    "input_emb_norm": False,
    "attention_layer_norm": False,
    "block_group_size": 1,
}


@dataclass
class LLaDAConfig(ConfigFile):
    """Shapes and token ids of a LLaDA model, in the shared blocks' field names. Defaults are LLaDA-8B's."""

    vocab_size: int = 126464  # LLaDA's embedding_size: rows of the embedding table and of the logits
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    mask_token_id: int = 126336
    pad_token_id: int | None = 126081
    eos_token_id: int | None = 126081
    bos_token_id: int | None = 126080
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in, informational
    head_dim: int = field(init=False)  # LLaDA's is always hidden_size // num_attention_heads

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        validate_transformer_config(self)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads}) in LLaDA's blocks"
            )
        if self.torch_dtype is not None and self.torch_dtype not in DTYPE_NAMES:
            raise ValueError(f"torch_dtype must be one of {sorted(DTYPE_NAMES)} or None, got {self.torch_dtype!r}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LLaDAConfig:
        """Build from a LLaDA `config.json` dictionary; unknown keys are ignored, unsupported features refused."""
        if not isinstance(raw, dict):
            raise TypeError(f"a config must be a dict, got {type(raw).__name__}")
        model_type = raw.get("model_type", "llada")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
        unsupported = [
            f"{key}={raw[key]!r} (supported: {value!r})"
            for key, value in _REQUIRED.items()
            if key in raw and raw[key] != value and not (key == "bias_for_layer_norm" and not raw[key])
        ]
        if unsupported:
            raise ValueError("LLaDA config settings this implementation does not support: " + ", ".join(unsupported))
        kwargs = {ours: raw[theirs] for theirs, ours in _RENAMED.items() if theirs in raw}
        kwargs["num_key_value_heads"] = _kv_heads(raw)
        kwargs["vocab_size"] = raw.get("embedding_size") or raw.get("vocab_size", cls.vocab_size)
        if raw.get("mlp_hidden_size") is not None:
            kwargs["intermediate_size"] = raw["mlp_hidden_size"]
        elif "mlp_ratio" in raw and "d_model" in raw:
            kwargs["intermediate_size"] = raw["mlp_ratio"] * raw["d_model"]
        kwargs["qkv_bias"] = bool(raw.get("include_qkv_bias") or False)
        kwargs["bos_token_id"] = raw.get("bos_token_id")  # LLaDA's configs name none (its tokenizer does)
        dtype_name = raw.get("torch_dtype", raw.get("dtype"))
        kwargs["torch_dtype"] = dtype_name if dtype_name in DTYPE_NAMES else None
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` form: LLaDA's model_type and field names."""
        ours = dataclasses.asdict(self)
        out: dict[str, Any] = {theirs: ours[name] for theirs, name in _RENAMED.items()}
        out.update(
            _REQUIRED,
            bias_for_layer_norm=False,
            n_kv_heads=self.num_key_value_heads,
            mlp_hidden_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            embedding_size=self.vocab_size,
            model_type="llada",
            architectures=["LLaDAModelLM"],
        )
        if self.torch_dtype is not None:
            out["torch_dtype"] = self.torch_dtype
        return out


def _kv_heads(raw: dict[str, Any]) -> int | None:
    """LLaDA's effective number of key/value heads (`n_kv_heads`, or `multi_query_attention`)."""
    n_kv, multi_query = raw.get("n_kv_heads"), raw.get("multi_query_attention")
    if multi_query is None:
        return n_kv
    implied = 1 if multi_query else raw.get("n_heads")
    if n_kv is not None and n_kv != implied:
        raise ValueError(f"n_kv_heads={n_kv} contradicts multi_query_attention={multi_query}")
    return implied
