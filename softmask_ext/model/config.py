"""Configuration of a Dream model (Qwen2 architecture, bidirectional attention), and the `config.json` I/O every
family's config shares (:class:`ConfigFile`).

Reads the `config.json` of a Dream checkpoint (`"model_type": "Dream"`) or of a plain Qwen2 checkpoint
(`"model_type": "qwen2"`); both use the same field names. Fields this implementation does not support (sliding-window
attention, RoPE scaling, an activation other than SiLU) are refused with a clear error instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..conventions import DTYPE_NAMES
from .transformer import validate_transformer_config

SUPPORTED_MODEL_TYPES = ("Dream", "dream", "qwen2")


class ConfigFile(ABC):
    """`config.json` reading and writing for a family's config dataclass."""

    @classmethod
    @abstractmethod
    def from_dict(cls, raw: dict[str, Any]) -> Any:
        """Build from a `config.json` dictionary in the family's own field names."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The `config.json` form, in the family's own field names."""

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> Any:
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {os.fspath(path)!r}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{os.fspath(path)!r} is not valid JSON: {e}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Any:
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        path = os.fspath(path)
        return cls.from_json_file(os.path.join(path, "config.json") if os.path.isdir(path) else path)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write `config.json` into the directory `path` (created if needed)."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    # peft and HF-style code read configs like mappings
    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


@dataclass
class DreamConfig(ConfigFile):
    """Shapes and token ids of a Dream model. Defaults are Dream-v0-7B's."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    qkv_bias: bool = True  # Qwen2 has biases on q/k/v and none on o
    mask_token_id: int = 151666
    pad_token_id: int | None = 151643
    eos_token_id: int | None = 151643
    bos_token_id: int | None = 151643
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in, informational

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        validate_transformer_config(self)
        if self.torch_dtype is not None and self.torch_dtype not in DTYPE_NAMES:
            raise ValueError(f"torch_dtype must be one of {sorted(DTYPE_NAMES)} or None, got {self.torch_dtype!r}")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DreamConfig:
        """Build from a Dream/Qwen2 `config.json` dictionary; unknown keys are ignored, unsupported features refused."""
        if not isinstance(raw, dict):
            raise TypeError(f"a config must be a dict, got {type(raw).__name__}")
        model_type = raw.get("model_type", "Dream")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported; Dream/Qwen2 use 'silu'")
        if raw.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=true is not supported: Dream attends to the whole sequence")
        rope_theta, rope_type = _rope_settings(raw)
        if rope_type != "default":
            raise ValueError(f"RoPE scaling {rope_type!r} is not supported; only the default rotary embedding is")

        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in fields}
        kwargs["rope_theta"] = rope_theta
        if "qkv_bias" not in raw and "attention_bias" in raw:
            kwargs["qkv_bias"] = bool(raw["attention_bias"])
        dtype_name = raw.get("torch_dtype", raw.get("dtype"))
        kwargs["torch_dtype"] = dtype_name if dtype_name in DTYPE_NAMES else None
        for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
            # Some configs list several EOS ids; the first is the one generation pads with.
            if isinstance(kwargs.get(name), list):
                kwargs[name] = kwargs[name][0] if kwargs[name] else None
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` form: Dream's model_type and the Qwen2 field names."""
        out = dataclasses.asdict(self)
        out["rope_scaling"] = None
        out["hidden_act"] = "silu"
        out["use_sliding_window"] = False
        out["model_type"] = "Dream"
        out["architectures"] = ["DreamModel"]
        if out["torch_dtype"] is None:
            del out["torch_dtype"]
        return out


def _rope_settings(raw: dict[str, Any]) -> tuple[float, str]:
    """(theta, type) from either the transformers-4 keys (`rope_theta`, `rope_scaling`) or v5's `rope_parameters`."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 1e6))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), rope_type
