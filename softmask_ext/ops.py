"""Public soft-masking ops, backed by the compiled kernels of :mod:`softmask_ext._C`.

The kernels are torch custom ops (``torch.ops.softmask_ext.*``) with fake kernels and autograd registered here,
so they work under ``torch.compile(fullgraph=True)`` and inside CUDA graphs. When the extension is missing or fails
to load (or was built without CUDA and is given CUDA tensors), the ops fall back to :mod:`softmask_ext.reference`
with one warning; the results agree up to rounding, ties in top-k aside (see :func:`topk_entropy`).

Both paths take the same inputs: every call is validated here, before it is dispatched, by the checks the kernels'
binding applies (same error types, same messages), so the fallback refuses exactly what the kernels refuse.
``SOFTMASK_EXT_FORCE_REFERENCE=1`` in the environment at import (or ``FORCE_REFERENCE = True`` on this module at
run time) sends every call to the reference even when the extension is loaded; tests use it to run both paths in one
process. ``SOFTMASK_TOPK_VARIANT`` selects the CUDA top-k/entropy kernel variant (``TOPK_VARIANTS``; read by the
extension at every call).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from . import reference

__all__ = [
    "topk_entropy",
    "blend_embeddings",
    "MAX_K",
    "SKIP_ROW",
    "EXTENSION_LOADED",
    "CUDA_KERNELS",
    "FORCE_REFERENCE",
    "TOPK_VARIANTS",
    "DEFAULT_TOPK_VARIANT",
    "cpu_isa",
]


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
FORCE_REFERENCE = os.environ.get("SOFTMASK_EXT_FORCE_REFERENCE", "") == "1"
# The largest k of topk_entropy; the kernel core (csrc/include/softmask/topk.h) owns it, and without the extension
# the same value applies so that both paths accept the same k (test_ops checks that the two agree).
MAX_K: int = _C.MAX_K if EXTENSION_LOADED else 32
# The ``rows`` entry of topk_entropy that asks for no work (zeros out): the kernel core's value, else the reference's.
SKIP_ROW: int = _C.SKIP_ROW if EXTENSION_LOADED else reference.SKIP_ROW
TOPK_VARIANTS: tuple[str, ...] = tuple(_C.TOPK_VARIANTS) if EXTENSION_LOADED else ()
DEFAULT_TOPK_VARIANT: str | None = _C.DEFAULT_TOPK_VARIANT if EXTENSION_LOADED else None


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
_KERNEL_DTYPE_NAMES = "float32, bfloat16 or float16 (or float64, served by the reference)"
_INT32_MAX = 2**31 - 1


def _use_kernels(t: Tensor) -> bool:
    """Whether the compiled kernels serve ``t`` (its device and dtype); otherwise the reference does.

    float64 inputs always go to the reference, which is exact enough for gradcheck-style tests. CUDA tensors with a
    CPU-only build fall back with one warning. Inputs are validated before this is asked.
    """
    global _warned_no_cuda_kernels
    if not EXTENSION_LOADED or FORCE_REFERENCE or t.dtype == torch.float64:
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


# The input contract of both paths. Each check mirrors one in the binding (python/op_args.h), with its error type and
# message, so a direct torch.ops call and a call through this module fail alike.


def _check_float(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in _KERNEL_DTYPES and t.dtype != torch.float64:
        raise TypeError(f"{op}: {name} must be {_KERNEL_DTYPE_NAMES}, got {t.dtype}")


def _check_same_device(op: str, name: str, t: Tensor, like: Tensor) -> None:
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {like.device}")


def _check_index_range(op: str, name: str, index: Tensor, bound: int, lowest: int = 0) -> None:
    """Host-side check that ``index`` lies in ``[lowest, bound)``, on CPU tensors (on CUDA the kernels assert on the
    device, which needs no sync); skipped while tracing, where the op's own check runs instead."""
    if index.is_cuda or index.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < lowest or hi >= bound:
        raise IndexError(f"{op}: {name} must lie in [{lowest}, {bound}), got values in [{lo}, {hi}]")


def _check_topk_entropy(logits: Tensor, k: int, rows: Tensor | None, temperature: float) -> None:
    op = "topk_entropy"
    if not isinstance(logits, Tensor):
        raise TypeError(f"{op}: logits must be a tensor, got {type(logits).__name__}")
    _check_float(op, "logits", logits)
    if logits.dim() < 1:
        raise ValueError(f"{op}: logits must have at least one dimension (the vocabulary)")
    vocab = logits.shape[-1]
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"{op}: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"{op}: k must be between 1 and {MAX_K}, got {k}")
    if k > vocab:
        raise ValueError(f"{op}: k={k} exceeds the vocabulary size V={vocab}")
    if not (isinstance(temperature, (int, float)) and 0.0 < temperature < float("inf")):
        raise ValueError(f"{op}: temperature must be a positive finite number, got {temperature}")
    if logits.stride(-1) != 1 and vocab != 1:
        raise ValueError(
            f"{op}: the last (vocabulary) dimension of logits must be contiguous (stride 1), got stride "
            f"{logits.stride(-1)}"
        )
    if rows is not None:
        if rows.dtype != torch.int64:
            raise TypeError(f"{op}: rows must be int64, got {rows.dtype}")
        _check_same_device(op, "rows", rows, logits)
        _check_index_range(op, "rows", rows, logits.numel() // vocab if vocab else 0, lowest=SKIP_ROW)


def _check_blend(weight: Tensor, ids: Tensor, coeffs: Tensor) -> None:
    op = "blend_embeddings"
    _check_float(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be [V, D], got shape {list(weight.shape)}")
    if ids.dtype != torch.int64:
        raise TypeError(f"{op}: ids must be int64, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{op}: ids must be [N, m], got shape {list(ids.shape)}")
    if not coeffs.dtype.is_floating_point:
        raise TypeError(f"{op}: coeffs must be a floating tensor, got {coeffs.dtype}")
    if coeffs.shape != ids.shape:
        raise ValueError(f"{op}: coeffs must have the shape of ids {list(ids.shape)}, got {list(coeffs.shape)}")
    if ids.numel() >= _INT32_MAX:
        raise ValueError(f"{op}: too many ids ({ids.numel()})")
    _check_same_device(op, "ids", ids, weight)
    _check_same_device(op, "coeffs", coeffs, weight)
    _check_index_range(op, "ids", ids, weight.shape[0])


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
            then have ``rows.shape`` as leading shape. An entry :data:`SKIP_ROW` (-1) asks for nothing: no logits are
            read and its outputs are zeros (so callers that need some rows' statistics keep fixed shapes). Other
            out-of-range rows raise IndexError (a device-side assert on CUDA, where no host synchronisation is
            allowed).
        temperature: temperature of the full softmax whose negative entropy is returned (top-k probabilities
            always use temperature 1).

    Returns:
        ``ids`` int64 ``[..., k]`` in descending logit order, equal logits by lower index first; ``probs`` fp32
        ``[..., k]``, the softmax over the k selected logits; ``neg_entropy`` fp32 ``[...]``, ``sum p log p``.
        A row holding NaN or ``+inf``, or no finite logit, gives NaN ``probs`` and ``neg_entropy`` (its ``ids`` are
        unspecified but in range).

    Raises:
        TypeError / ValueError / IndexError naming the argument, alike with and without the compiled extension.
    """
    _check_topk_entropy(logits, k, rows, temperature)
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

    Raises:
        TypeError / ValueError / IndexError naming the argument, alike with and without the compiled extension.
    """
    _check_blend(weight, ids, coeffs)
    if not _use_kernels(weight):
        return reference.blend_embeddings(weight, ids, coeffs)
    return torch.ops.softmask_ext.blend_embeddings(weight, ids, coeffs)
