"""Pure-PyTorch reference of the soft-masking ops.

These functions define the semantics of :mod:`softmask_ext.ops`: the property tests use them as the oracle, and
:mod:`softmask_ext.ops` falls back to them when the compiled extension is missing (after validating the inputs with the
same checks as the kernels; these functions assume valid inputs). They favour clarity over speed (several passes over
each logits row, a gathered ``[N, m, D]`` intermediate in the blend).


:func:`dense_soft_embeddings` is the other reference: the authors' formulation, which builds a dense
``[N, V]`` mixture and multiplies it by the embedding table. It exists only as a baseline for benchmarks and
as an independent oracle in tests; nothing in the library calls it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SKIP_ROW", "topk_entropy", "blend_embeddings", "neg_entropy", "dense_soft_embeddings"]


# A ``rows`` entry asking for no work: that output row is zeros (ids, probs and neg_entropy).
SKIP_ROW = -1


def _flat_rows(logits: Tensor, rows: Tensor | None) -> tuple[Tensor, tuple[int, ...]]:
    """``logits`` as ``[R, V]`` (the selected rows, or all of them; a :data:`SKIP_ROW` entry takes row 0, its
    outputs are replaced afterwards) and the leading shape of the outputs."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    if rows is None:
        return flat, tuple(logits.shape[:-1])
    return flat[rows.reshape(-1).clamp_min(0)], tuple(rows.shape)


def neg_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``sum_v p_v log p_v`` with ``p = softmax(logits / temperature)``, fp32, over the last dimension.

    ``-inf`` logits contribute nothing (``0 * log 0 = 0``); a row holding NaN or ``+inf``, or no finite
    logit, gives NaN.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    p = logp.exp()
    terms = p * logp
    # p == 0 only where the logit is -inf (or underflows): those terms are 0, not 0 * -inf = NaN.
    # NaN compares unequal to 0, so NaN rows stay NaN.
    terms = torch.where(p == 0, torch.zeros_like(terms), terms)
    out = terms.sum(-1)
    finite = torch.isfinite(logits).any(-1) & ~(torch.isnan(logits) | (logits == float("inf"))).any(-1)
    return torch.where(finite, out, torch.full_like(out, float("nan")))


def topk_entropy(
    logits: Tensor, k: int, rows: Tensor | None = None, temperature: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k tokens, their renormalised probabilities, and the negative entropy of each logits row.

    Args:
        logits: ``[..., V]`` fp32/bf16/fp16.
        k: number of tokens to keep, ``1 <= k <= V``.
        rows: optional int64 indices into the flattened leading dimensions (``logits.reshape(-1, V)``);
            when given, only those rows are processed and the outputs have ``rows.shape`` as leading shape. An
            entry :data:`SKIP_ROW` (-1) gives zeros in every output.
        temperature: temperature of the full softmax whose negative entropy is returned (the top-k
            probabilities always use temperature 1).

    Returns:
        ``ids`` int64 ``[..., k]`` in descending logit order, ``probs`` fp32 ``[..., k]`` (softmax over the k
        selected logits), ``neg_entropy`` fp32 ``[...]``. Rows holding NaN or ``+inf``, or no finite logit, give
        NaN ``probs`` and ``neg_entropy``.
    """
    flat, lead = _flat_rows(logits, rows)
    values, ids = torch.topk(flat.float(), k, dim=-1, sorted=True)
    probs = torch.softmax(values, dim=-1)
    negh = neg_entropy(flat, temperature)
    probs = torch.where(torch.isnan(negh)[:, None], torch.full_like(probs, float("nan")), probs)
    if rows is not None:
        skipped = rows.reshape(-1) == SKIP_ROW
        ids, probs = ids.masked_fill(skipped[:, None], 0), probs.masked_fill(skipped[:, None], 0.0)
        negh = negh.masked_fill(skipped, 0.0)
    return ids.reshape(*lead, k), probs.reshape(*lead, k), negh.reshape(lead)


def blend_embeddings(weight: Tensor, ids: Tensor, coeffs: Tensor) -> Tensor:
    """``out[n] = sum_j coeffs[n, j] * weight[ids[n, j]]``, accumulated in fp32, returned in ``weight.dtype``.

    Args:
        weight: ``[V, D]`` embedding table.
        ids: int64 ``[N, m]`` rows of ``weight`` to blend (:func:`softmask_ext.ops.blend_embeddings` checks them).
        coeffs: ``[N, m]`` blend coefficients (any float dtype).

    Returns:
        ``[N, D]`` in ``weight.dtype``; differentiable with respect to ``weight`` and ``coeffs``.
    """
    acc = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs (gradcheck)
    rows = weight[ids].to(acc)  # [N, m, D]
    return (coeffs.to(acc).unsqueeze(-1) * rows).sum(-2).to(weight.dtype)


def dense_soft_embeddings(logits: Tensor, weight: Tensor, mask_token_id: int, lam: Tensor, k: int) -> Tensor:
    """The authors' soft-mask blend: a dense ``[N, V]`` mixture times the ``[V, D]`` table (baseline only).

    ``e = (1 - lam) * E[mask] + lam * sum_{i in topk} pi_i * E[v_i]`` for each of the ``N`` rows of ``logits``
    (``[N, V]``), with ``lam`` of shape ``[N]``. Returns ``[N, D]`` in ``weight.dtype``.
    """
    values, ids = torch.topk(logits.float(), k, dim=-1)
    mixture = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    mixture.scatter_(-1, ids, torch.softmax(values, dim=-1))
    mixture = lam.float()[:, None] * mixture
    mixture[:, mask_token_id] += 1.0 - lam.float()
    return (mixture.to(weight.dtype) @ weight).to(weight.dtype)
