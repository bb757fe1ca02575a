"""LoRA / DoRA adapters through peft, or full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn

from ..conventions import ADAPTER_WEIGHTS, MODEL_WEIGHTS
from ..model.family import family_of

__all__ = ["AdapterConfig", "apply_adapters", "load_trainable", "ADAPTER_KINDS"]

ADAPTER_KINDS = ("full", "lora", "dora")


@dataclass(frozen=True)
class AdapterConfig:
    """``kind="full"`` trains every weight; ``lora``/``dora`` freeze the base and train adapters on ``targets``
    (module names; None: the model family's ``adapter_targets``, its attention projections)."""

    kind: Literal["full", "lora", "dora"] = "full"
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter kind must be one of {ADAPTER_KINDS}, got {self.kind!r}")
        if self.rank < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"adapter needs rank >= 1, alpha > 0 and 0 <= dropout < 1; got rank={self.rank}, "
                f"alpha={self.alpha}, dropout={self.dropout}"
            )
        if self.targets is not None and not self.targets:
            raise ValueError("adapter targets must name at least one module (e.g. q_proj)")


def apply_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Return the model to train: ``model`` itself (full) or a peft model with LoRA/DoRA on ``config.targets``
    (default: the family's ``adapter_targets``)."""
    if config.kind == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.targets or family_of(model).adapter_targets),
        use_dora=config.kind == "dora",
        bias="none",
    )
    return get_peft_model(model, lora)


def load_trainable(model: nn.Module, config: AdapterConfig, directory: Path) -> None:
    """Load what ``model.save_pretrained`` wrote (the whole model, or the adapters in PEFT format) into ``model``,
    in place; every tensor must match."""
    from safetensors.torch import load_file

    if config.kind == "full":
        state = load_file(str(directory / MODEL_WEIGHTS))
        tied_head = model.weight_name(model.get_output_embeddings()) if model.config.tie_word_embeddings else None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if k != tied_head]:
            raise ValueError(
                f"{directory}: checkpoint does not match the model (missing {missing}, unexpected {unexpected})"
            )
        return
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_file(str(directory / ADAPTER_WEIGHTS)))
    if result.unexpected_keys:
        raise ValueError(f"{directory}: adapter weights do not match the model: {result.unexpected_keys}")
