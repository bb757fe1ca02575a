"""Conventions shared across the package, each with one owner: the shipped model's folder, the dtype names the CLIs
and configs accept, the default device, the file names of a checkpoint folder, the padding token, and the ids of
the independent random streams.

This module imports nothing from the package, so every layer (model, training, evaluation, the CLIs) may use it.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SHIPPED_MODEL",
    "DTYPE_NAMES",
    "default_device",
    "pad_or_eos",
    "RandomStream",
    "CONFIG_FILE",
    "MODEL_WEIGHTS",
    "MODEL_INDEX",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "SOFT_MASK_WEIGHTS",
]

#: The tiny Dream-architecture code model shipped inside the package (written by ``python -m softmask_ext.pretrain
#: --output softmask_ext/assets/tiny-coder``): the default ``--model`` of ``finetune``, ``generate`` and ``evaluate``.
SHIPPED_MODEL = Path(__file__).resolve().parent / "assets" / "tiny-coder"

#: Floating-point dtypes by the names ``--dtype`` and ``config.json``'s ``torch_dtype`` use.
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# File names inside a checkpoint folder (weights are read from safetensors only).
CONFIG_FILE = "config.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SOFT_MASK_WEIGHTS = "soft_mask.safetensors"
EMA_WEIGHTS = "ema.safetensors"  # the exponential moving average of an MDLM run's weights


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pad_or_eos(config: Any) -> int:
    """The token id that pads batches: ``pad_token_id``, or ``eos_token_id`` when there is none (a model config or
    a tokenizer). Raises ``ValueError`` when neither is set."""
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "eos_token_id", None)
    if pad is None:
        raise ValueError(f"{type(config).__name__} names neither a pad nor an eos token id; one is needed for padding")
    return int(pad)


class RandomStream(IntEnum):
    """Ids of the independent random streams: draw ``index`` of stream ``s`` under run seed ``seed`` comes from a
    generator seeded by ``(seed, s, index)`` (``softmask_ext.training.noise.stream_generator``). The values are part
    of every recorded run's reproducibility: never renumber them."""

    NOISE = 1  # training noise of a micro-batch
    SM_COIN = 2  # whether a micro-batch takes the two-pass SM forward
    VALIDATION = 3  # the trainer's validation noise
    TORCH_RNG = 4  # the global torch seed of a training step (dropout and other torch-side randomness)
    ELBO = 0x454C424F  # ELBO evaluation noise ("ELBO" in ASCII)
