"""softmask-ext: soft-masking for masked diffusion language models.

Fused kernels (:mod:`softmask_ext.ops`), the learnable soft-mask (:class:`SoftMask`), the Dream and LLaDA models
(:class:`DreamModel`, :class:`LLaDAModel`, any checkpoint through :func:`load_model`), a soft-masked diffusion
decoding engine, fine-tuning and evaluation.

Heavy submodules load on first use, so ``import softmask_ext`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily by __getattr__)
_EXPORTS = {
    "SoftMask": "softmask_ext.soft_mask",
    "DreamModel": "softmask_ext.model",
    "DreamConfig": "softmask_ext.model",
    "LLaDAModel": "softmask_ext.model",
    "LLaDAConfig": "softmask_ext.model",
    "load_tokenizer": "softmask_ext.model",
    "load_model": "softmask_ext.model",
    "diffusion_generate": "softmask_ext.decoding",
}

__all__ = ["__version__", "ops", "reference", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("ops", "reference"):
        return importlib.import_module(f"softmask_ext.{name}")
    raise AttributeError(f"module 'softmask_ext' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
