"""Model families: the one place that states a model's conventions, and the registry that loads any checkpoint.

A *family* (Dream, LLaDA, ...) owns everything that differs between masked diffusion LMs and that shared code
(decoding, the two-pass SM step, the objective, the ELBO, gate initialisation, FSDP) must respect:

- ``logit_shift``: ``1`` when the prediction for position ``i`` is logits row ``i - 1`` (Dream; position 0 takes
  row 0), ``0`` when row ``i`` predicts position ``i`` (LLaDA, MDLM). Shared code never writes a shift by hand: it
  calls :func:`prediction_row_index` / :func:`align_logits` with the family's value.
- the decoder-layer class (the unit FSDP wraps) and the default decoding keywords;
- token ids (mask, pad, eos, bos) live on each checkpoint's config (``config.mask_token_id`` ...), since they differ
  between checkpoints of one family.

Each model class sets ``family = ModelFamily(...)`` as a class attribute and registers it with :func:`register_family`
(the package ``softmask_ext.model`` imports every built-in family's module, so they are registered before anything here
runs; this module imports no model); :func:`load_model` reads a checkpoint's ``config.json``, finds the family claiming
its ``model_type`` and calls that family's loader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..conventions import ADAPTER_CONFIG

__all__ = [
    "ModelFamily",
    "register_family",
    "registered_families",
    "family_for_model_type",
    "family_of",
    "load_model",
    "load_config",
    "prediction_row_index",
    "align_logits",
]


@dataclass(frozen=True)
class ModelFamily:
    """A model family's conventions.

    Attributes:
        name: short name (``"dream"``, ``"llada"``, ...), used in messages and CLI output.
        model_types: the ``config.json`` ``model_type`` values this family claims.
        logit_shift: 1 (row ``i - 1`` predicts position ``i``) or 0 (row ``i`` predicts position ``i``).
        load: ``load(path, dtype=None, device=None, **kwargs) -> nn.Module`` for a checkpoint directory.
        decoder_layer: the class of one transformer block (the unit of FSDP wrapping and checkpointing).
        default_decoding: keyword defaults of the family's own ``generate`` (documentation and CLIs).
        adapter_targets: module names LoRA/DoRA adapt by default (the attention projections, as the family's
            checkpoints name them).
        config_class: the family's config (``config_class.from_pretrained(path)`` reads a checkpoint's
            ``config.json``), for callers that size things before loading any weights.
    """

    name: str
    model_types: tuple[str, ...]
    logit_shift: int
    load: Callable[..., nn.Module]
    decoder_layer: type[nn.Module]
    default_decoding: Mapping[str, Any] = field(default_factory=dict)
    adapter_targets: tuple[str, ...] = ()
    config_class: type | None = None

    def __post_init__(self) -> None:
        if self.logit_shift not in (0, 1):
            raise ValueError(f"family {self.name!r}: logit_shift must be 0 or 1, got {self.logit_shift!r}")


_REGISTRY: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Make ``family`` loadable by :func:`load_model`; a ``model_type`` claimed twice is an error."""
    for model_type in family.model_types:
        owner = _REGISTRY.get(model_type.lower())
        if owner is not None and owner.name != family.name:
            raise ValueError(f"model_type {model_type!r} is claimed by both {owner.name!r} and {family.name!r}")
        _REGISTRY[model_type.lower()] = family
    return family


def registered_families() -> list[ModelFamily]:
    """Every registered family, once each, in registration order."""
    return list({family.name: family for family in _REGISTRY.values()}.values())


def family_for_model_type(model_type: str) -> ModelFamily:
    """The family that claims ``model_type`` (case-insensitive); ValueError listing the supported ones otherwise."""
    family = _REGISTRY.get(str(model_type).lower())
    if family is None:
        supported = ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in registered_families())
        raise ValueError(f"no model family handles model_type {model_type!r}; supported: {supported}")
    return family


def family_of(model: nn.Module) -> ModelFamily:
    """The family of a model instance (unwrapping PEFT/DDP/FSDP/compile wrappers)."""
    for candidate in (model, getattr(model, "module", None), _peft_base(model), getattr(model, "_orig_mod", None)):
        family = getattr(type(candidate), "family", None) if candidate is not None else None
        if isinstance(family, ModelFamily):
            return family
    raise TypeError(f"{type(model).__name__} declares no model family (a `family = ModelFamily(...)` class attribute)")


def load_model(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None, **kwargs: Any
) -> nn.Module:
    """Load any registered family's checkpoint directory (``config.json`` + safetensors), or an adapter folder.

    The family is chosen by ``config.json``'s ``model_type``; an adapter folder (PEFT LoRA/DoRA, no
    ``config.json``) is resolved through its base checkpoint. Extra keyword arguments go to the family's loader
    (e.g. ``base_model=`` for adapter folders).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    return family_for_model_type(checkpoint_model_type(path, kwargs.get("base_model"))).load(
        path, dtype=dtype, device=device, **kwargs
    )


def load_config(path: str | os.PathLike) -> Any:
    """The config of a checkpoint directory (any registered family), without loading weights."""
    path = os.fspath(path)
    family = family_for_model_type(checkpoint_model_type(path))
    if family.config_class is None:
        raise TypeError(f"family {family.name!r} declares no config_class")
    return family.config_class.from_pretrained(path)


def checkpoint_model_type(path: str, base_model: str | os.PathLike | None = None) -> str:
    """``model_type`` of a checkpoint directory, following an adapter folder to its base checkpoint."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        adapter = os.path.join(path, ADAPTER_CONFIG)
        if not os.path.isfile(adapter):
            raise FileNotFoundError(f"{path!r} has neither config.json nor adapter_config.json")
        with open(adapter, encoding="utf-8") as f:
            base = base_model or json.load(f).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"adapter folder {path!r} records no base model; pass base_model=")
        if not os.path.isdir(base):
            raise FileNotFoundError(
                f"the adapters in {path!r} belong to the base model {os.fspath(base)!r}, which is not a directory "
                f"here; pass the base checkpoint as base_model= (--base-model on the command line)"
            )
        return checkpoint_model_type(os.fspath(base))
    with open(config_path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if "model_type" not in raw:
        raise ValueError(f"{config_path} has no model_type")
    return raw["model_type"]


def prediction_row_index(positions: Tensor, logit_shift: int) -> Tensor:
    """Logits rows that predict ``positions`` (any int64 tensor of sequence positions): ``positions - shift``,
    clamped at 0 (with a shift, position 0 takes row 0, as Dream does)."""
    return (positions - logit_shift).clamp_min(0) if logit_shift else positions


def align_logits(logits: Tensor, logit_shift: int) -> Tensor:
    """``[B, T, V]`` logits re-indexed so that row ``i`` predicts position ``i`` (a copy only when shifted)."""
    if not logit_shift:
        return logits
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def _peft_base(model: nn.Module) -> nn.Module | None:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else None
