"""Public soft-masking ops (first version: the pure-PyTorch reference; the compiled kernels replace it)."""

from __future__ import annotations

from torch import Tensor

from . import reference

__all__ = ["topk_entropy", "blend_embeddings", "MAX_K"]

MAX_K = 32


def _check_k(k: int, vocab: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"topk_entropy: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"topk_entropy: k must be between 1 and {MAX_K}, got {k}")
    if k > vocab:
        raise ValueError(f"topk_entropy: k={k} exceeds the vocabulary size V={vocab}")


def topk_entropy(
    logits: Tensor, k: int, rows: Tensor | None = None, temperature: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """See :func:`softmask_ext.reference.topk_entropy`."""
    _check_k(k, logits.shape[-1])
    return reference.topk_entropy(logits, k, rows, temperature)


def blend_embeddings(weight: Tensor, ids: Tensor, coeffs: Tensor) -> Tensor:
    """See :func:`softmask_ext.reference.blend_embeddings`."""
    return reference.blend_embeddings(weight, ids, coeffs)
