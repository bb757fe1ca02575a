"""Public soft-masking ops, backed by the compiled kernels of :mod:`softmask_ext._C`.

The kernels are torch custom ops (``torch.ops.softmask_ext.*``) with fake kernels and autograd registered here,
so they work under ``torch.compile(fullgraph=True)`` and inside CUDA graphs. When the extension is missing or fails
to load (or was built without CUDA and is given CUDA tensors), the ops fall back to :mod:`softmask_ext.reference`
with one warning; the results agree up to rounding, ties in top-k aside (see :func:`topk_entropy`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import reference

__all__ = ["topk_entropy", "blend_embeddings", "MAX_K", "EXTENSION_LOADED", "CUDA_KERNELS", "cpu_isa"]

MAX_K = 32


def _load_extension():
    """The compiled module (importing it registers ``torch.ops.softmask_ext``), or None with one warning."""
    try:
        from . import _C
    except Exception as exc:  # ImportError, undefined symbols from a torch mismatch, registration errors
        warnings.warn(
            f"softmask_ext: the compiled kernels could not be loaded ({type(exc).__name__}: {exc}); falling back to "
            "the much slower pure-PyTorch reference. Build them with `pip install .` (or "
            "`python setup.py build_ext --inplace` in a source checkout).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _C


_C = _load_extension()
EXTENSION_LOADED = _C is not None
CUDA_KERNELS = bool(EXTENSION_LOADED and _C.with_cuda)


def cpu_isa() -> str | None:
    """The instruction set the CPU kernels run with on this machine (chosen at run time), or ``None`` without the
    compiled extension."""
    return _C.cpu_isa() if EXTENSION_LOADED else None
if EXTENSION_LOADED:

    @torch.library.register_fake("softmask_ext::topk_entropy")
    def _topk_entropy_fake(logits: Tensor, k: int, rows: Tensor | None = None, temperature: float = 1.0):
        lead = tuple(rows.shape) if rows is not None else tuple(logits.shape[:-1])
        return (
            logits.new_empty((*lead, k), dtype=torch.int64),
            logits.new_empty((*lead, k), dtype=torch.float32),
            logits.new_empty(lead, dtype=torch.float32),
        )

    @torch.library.register_fake("softmask_ext::blend_embeddings")
    def _blend_fake(weight: Tensor, ids: Tensor, coeffs: Tensor) -> Tensor:
        return weight.new_empty((ids.shape[0], weight.shape[1]))

    @torch.library.register_fake("softmask_ext::blend_embeddings_backward")
    def _blend_backward_fake(
        grad_out: Tensor, weight: Tensor, ids: Tensor, coeffs: Tensor, deterministic: bool, weight_grad: bool = True
    ):
        rows = weight.shape[0] if weight_grad else 0
        return weight.new_empty((rows, weight.shape[1])), torch.empty_like(coeffs)

    def _blend_setup_context(ctx, inputs, output) -> None:
        weight, ids, coeffs = inputs
        ctx.save_for_backward(weight, ids, coeffs)

    def _blend_backward(ctx, grad_out: Tensor):
        weight, ids, coeffs = ctx.saved_tensors
        weight_grad = ctx.needs_input_grad[0]
        grad_weight, grad_coeffs = torch.ops.softmask_ext.blend_embeddings_backward(
            grad_out, weight, ids, coeffs, torch.are_deterministic_algorithms_enabled(), weight_grad
        )
        return (
            grad_weight if weight_grad else None,
            None,
            grad_coeffs if ctx.needs_input_grad[2] else None,
        )

    torch.library.register_autograd(
        "softmask_ext::blend_embeddings", _blend_backward, setup_context=_blend_setup_context
    )

_warned_no_cuda_kernels = False
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _use_kernels(t: Tensor) -> bool:
    """Whether the compiled kernels serve ``t`` (its device and dtype); otherwise the reference does.

    float64 inputs always go to the reference, which is exact enough for gradcheck-style tests; other dtypes reach
    the kernels, which reject them with a TypeError. CUDA tensors with a CPU-only build fall back with one warning.
    """
    global _warned_no_cuda_kernels
    if not EXTENSION_LOADED or t.dtype == torch.float64:
        return False
    if t.device.type != "cuda" or CUDA_KERNELS:
        return True
    if not _warned_no_cuda_kernels:
        _warned_no_cuda_kernels = True
        warnings.warn(
            "softmask_ext: the extension was built without CUDA kernels; CUDA tensors use the pure-PyTorch "
            "reference. Rebuild on a machine with a CUDA toolkit (`pip install --no-build-isolation .`).",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


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
    """Top-k tokens, their renormalised probabilities, and the negative entropy of each logits row.

    One pass over each row, fp32 accumulation. Not differentiable (its inputs are the previous pass's logits).

    Args:
        logits: ``[..., V]`` fp32/bf16/fp16, last dimension contiguous; ``-inf`` entries are allowed (float64 is
            served by the reference implementation).
        k: ``1 <= k <= min(MAX_K, V)``, else ValueError.
        rows: optional int64 indices into the flattened leading dimensions (``logits.reshape(-1, V)``); the outputs
            then have ``rows.shape`` as leading shape. Out-of-range rows raise IndexError (a device-side assert on
            CUDA, where no host synchronisation is allowed).
        temperature: temperature of the full softmax whose negative entropy is returned (top-k probabilities
            always use temperature 1).

    Returns:
        ``ids`` int64 ``[..., k]`` in descending logit order, equal logits by lower index first; ``probs`` fp32
        ``[..., k]``, the softmax over the k selected logits; ``neg_entropy`` fp32 ``[...]``, ``sum p log p``.
        A row holding NaN or ``+inf``, or no finite logit, gives NaN ``probs`` and ``neg_entropy`` (its ``ids`` are
        unspecified but in range).
    """
    _check_k(k, logits.shape[-1])
    if not _use_kernels(logits):
        return reference.topk_entropy(logits, k, rows, temperature)
    ids, probs, neg_entropy = torch.ops.softmask_ext.topk_entropy(logits.detach(), k, rows, float(temperature))
    return ids, probs, neg_entropy


def blend_embeddings(weight: Tensor, ids: Tensor, coeffs: Tensor) -> Tensor:
    """``out[n] = sum_j coeffs[n, j] * weight[ids[n, j]]``, accumulated in fp32, returned in ``weight.dtype``.

    Args:
        weight: ``[V, D]`` fp32/bf16/fp16 embedding table (float64 is served by the reference implementation).
        ids: int64 ``[N, m]``, each in ``[0, V)`` (else IndexError; a device-side assert on CUDA).
        coeffs: ``[N, m]`` floating blend coefficients.

    Returns:
        ``[N, D]`` in ``weight.dtype``. Differentiable with respect to ``weight`` (each table row's gradient is
        summed in fp32; deterministic under ``torch.use_deterministic_algorithms(True)``, and always on the CPU)
        and ``coeffs``.
    """
    if not _use_kernels(weight):
        return reference.blend_embeddings(weight, ids, coeffs)
    return torch.ops.softmask_ext.blend_embeddings(weight, ids, coeffs)
