"""Comparisons of the compiled ops with softmask_ext.reference, shared by the CPU and CUDA kernel tests."""

from __future__ import annotations

import torch
from torch import Tensor

from softmask_ext import ops, reference

# neg_entropy and probs are computed in fp32 from the same (exactly converted) inputs in both implementations,
# so one tolerance serves every input dtype; blend outputs are rounded to the weight's dtype.
ENTROPY_TOL = dict(rtol=1e-4, atol=1e-4)
PROBS_TOL = dict(rtol=1e-4, atol=1e-6)
BLEND_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),  # sums of hundreds of terms in another order
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def make_logits(shape, dtype, scale=3.0, neg_inf_fraction=0.0, tie_levels=0, generator=None, device="cpu") -> Tensor:
    """Random logits; tie_levels > 0 rounds them onto that many distinct values (many exact ties)."""
    x = torch.randn(shape, generator=generator, device=device) * scale
    if tie_levels:
        x = torch.round(x / (x.abs().max() + 1e-6) * tie_levels)
    if neg_inf_fraction:
        x[torch.rand(shape, generator=generator, device=device) < neg_inf_fraction] = float("-inf")
    return x.to(dtype)


def make_invalid_rows(n_rows: int, dtype, device="cpu") -> Tensor:
    """[n_rows >= 5, 3000] logits whose first four rows are invalid (NaN, +inf, all -inf, all NaN); the rest random."""
    logits = make_logits((n_rows, 3000), dtype, device=device)
    logits[0, 17] = float("nan")
    logits[1, 2999] = float("inf")
    logits[2] = float("-inf")
    logits[3] = float("nan")
    return logits


def assert_topk_entropy_matches(logits: Tensor, k: int, rows: Tensor | None = None, temperature: float = 1.0) -> None:
    """Ours against the reference: values rather than indices where logits tie, NaN exactly where expected."""
    ids, probs, negh = ops.topk_entropy(logits, k, rows, temperature)
    ref_ids, ref_probs, ref_negh = reference.topk_entropy(logits, k, rows, temperature)
    assert ids.shape == ref_ids.shape and ids.dtype == torch.int64
    assert probs.shape == ref_probs.shape and probs.dtype == torch.float32
    assert negh.shape == ref_negh.shape and negh.dtype == torch.float32
    vocab = logits.shape[-1]
    assert bool(((ids >= 0) & (ids < vocab)).all()), "ids out of range"

    torch.testing.assert_close(negh, ref_negh, equal_nan=True, **ENTROPY_TOL)
    torch.testing.assert_close(probs, ref_probs, equal_nan=True, **PROBS_TOL)

    flat = logits.reshape(-1, vocab).float()
    source = rows.reshape(-1) if rows is not None else torch.arange(flat.shape[0], device=logits.device)
    skipped = source == ops.SKIP_ROW
    for out in (ids, probs, negh):  # a skipped row is zeros, and only that
        assert bool((out.reshape(len(source), -1 if len(source) else 0)[skipped] == 0).all()), "skipped row not zeros"
    source = source.clamp_min(0)
    valid = ~torch.isnan(ref_negh.reshape(-1)) & ~skipped
    picked = flat[source][valid].gather(-1, ids.reshape(-1, k)[valid])
    expected = flat[source][valid].gather(-1, ref_ids.reshape(-1, k)[valid])
    torch.testing.assert_close(picked, expected, rtol=0, atol=0)  # same logits, in the same (descending) order
    distinct = torch.sort(ids.reshape(-1, k)[valid], dim=-1).values.diff(dim=-1)
    assert bool((distinct > 0).all()), "an id was selected twice"


def assert_lower_index_wins_ties(logits: Tensor, k: int) -> None:
    """Ours breaks ties by the lower index: the selected ids equal a stable descending sort's first k."""
    ids, _, _ = ops.topk_entropy(logits, k)
    order = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[..., :k]
    assert torch.equal(ids, order)


def blend_with_grads(fn, weight: Tensor, ids: Tensor, coeffs: Tensor, grad_out: Tensor):
    w = weight.detach().clone().requires_grad_(True)
    c = coeffs.detach().clone().requires_grad_(True)
    out = fn(w, ids, c)
    out.backward(grad_out)
    return out.detach(), w.grad, c.grad


def assert_blend_matches(weight: Tensor, ids: Tensor, coeffs: Tensor) -> None:
    """Forward and both gradients of ours against the reference evaluated in fp32 (the accumulation precision the
    op promises), rounded to the dtypes the op returns."""
    g = torch.Generator(device=weight.device).manual_seed(ids.numel() + weight.shape[1])
    grad_out = torch.randn(ids.shape[0], weight.shape[1], device=weight.device, generator=g).to(weight.dtype)
    out, gw, gc = blend_with_grads(ops.blend_embeddings, weight, ids, coeffs, grad_out)
    ref_out, ref_gw, ref_gc = blend_with_grads(
        reference.blend_embeddings, weight.float(), ids, coeffs.float(), grad_out.float()
    )
    tol = BLEND_TOL[weight.dtype]
    assert out.dtype == weight.dtype and gw.dtype == weight.dtype and gc.dtype == coeffs.dtype
    torch.testing.assert_close(out, ref_out.to(weight.dtype), **tol)
    torch.testing.assert_close(gw, ref_gw.to(weight.dtype), **tol)
    torch.testing.assert_close(gc, ref_gc.to(coeffs.dtype), **BLEND_TOL[coeffs.dtype])
