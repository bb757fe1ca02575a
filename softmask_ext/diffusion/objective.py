"""Masked-token cross-entropy of masked diffusion training (the MDLM ELBO with a linear schedule).

For a batch noised at level ``t``, the loss is

    L = sum_{masked positions i} CE(logits_i, x_i) / t   /   N

where ``N`` is the number of response tokens (the tokens that could have been masked), not the number that were.
This is MDLM's normalisation: ``E_t[L]`` is the negative ELBO per response token, an upper bound on the per-token
negative log-likelihood, so ``exp(L)`` bounds the perplexity and the number is comparable across masking levels.
In training ``N`` is counted over the whole optimizer step (all micro-batches on all processes), which makes the
gradient independent of how the step is split into micro-batches and processes.

Which logits row predicts token ``i`` is the model family's convention (``logit_shift``: Dream predicts token ``i``
from row ``i - 1``, LLaDA from row ``i``); the rows are gathered through
:func:`softmask_ext.model.family.prediction_row_index`, without materialising a shifted copy of the ``[B, T, V]``
logits.

The authors' Dream fine-tuning normalises per sequence instead (:func:`sequence_mean_loss`): each sequence adds
``(1 / t) * mean CE over its masked tokens``, whatever its length, and the terms of a step are summed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.family import prediction_row_index

__all__ = ["prediction_rows", "masked_token_loss", "sequence_mean_loss"]


def prediction_rows(logits: Tensor, positions: Tensor, logit_shift: int) -> Tensor:
    """The logits rows that predict the tokens at ``positions``.

    logits:      [B, T, V]
    positions:   bool [B, T]
    logit_shift: the model family's (``family_of(model).logit_shift``)
    returns:     [N, V] with N = positions.sum(), in row-major order of ``positions``
    """
    batch_idx, pos_idx = positions.nonzero(as_tuple=True)
    return logits[batch_idx, prediction_row_index(pos_idx, logit_shift)]


def masked_token_loss(
    logits: Tensor,
    targets: Tensor,
    masked: Tensor,
    t: float,
    num_tokens: int | Tensor,
    logit_shift: int,
) -> Tensor:
    """The weighted masked-token cross-entropy, normalised per response token (see the module docstring).

    logits:      [B, T, V] model output for the noised input (any float dtype; the loss is computed in fp32)
    targets:     int64 [B, T], the clean tokens
    masked:      bool [B, T], the positions that were masked
    t:           the batch's masking probability; every masked token is weighted by ``1 / t``
    num_tokens:  the normaliser ``N`` (response tokens in the batch, or in the whole optimizer step)
    logit_shift: the model family's (``family_of(model).logit_shift``)
    returns:     fp32 scalar
    """
    _check_shapes(logits, targets, masked)
    if not 0.0 < t <= 1.0:
        raise ValueError(f"masking probability t must be in (0, 1], got {t}")
    rows = prediction_rows(logits, masked, logit_shift).float()
    token_loss = F.cross_entropy(rows, targets[masked], reduction="sum")
    return token_loss / t / num_tokens


def sequence_mean_loss(logits: Tensor, targets: Tensor, masked: Tensor, t: Tensor, logit_shift: int) -> Tensor:
    """``sum_b (1 / t_b) * mean_{masked i of row b} CE(logits, x_i)``: the authors' Dream loss, one term per sequence.

    Their trainer runs one sequence per micro-batch, takes the mean cross-entropy over its masked tokens times
    ``1/t``, and sums the terms of the accumulation steps (it does not divide by their number); summing over the rows
    of a batch gives the same step whatever the split into micro-batches.

    logits:      [B, T, V] (the loss is computed in fp32)
    targets:     int64 [B, T], the clean tokens
    masked:      bool [B, T], the masked positions (at least one per row)
    t:           [B], each sequence's noise level
    logit_shift: the model family's (``family_of(model).logit_shift``)
    returns:     fp32 scalar
    """
    _check_shapes(logits, targets, masked)
    if tuple(t.shape) != (targets.shape[0],) or not bool(((t > 0) & (t <= 1)).all()):
        raise ValueError(f"t must hold one noise level in (0, 1] per row ({targets.shape[0]}), got {t}")
    counts = masked.sum(dim=1)
    if not bool((counts > 0).all()):
        raise ValueError("every row needs a masked token: the per-sequence mean of an empty row is undefined")
    rows = prediction_rows(logits, masked, logit_shift).float()
    token_loss = F.cross_entropy(rows, targets[masked], reduction="none")
    per_row = torch.zeros(targets.shape[0], device=token_loss.device).index_add_(
        0, masked.nonzero(as_tuple=True)[0], token_loss
    )
    weight = 1.0 / t.to(device=per_row.device, dtype=torch.float32)
    return (per_row / counts * weight).sum()


def _check_shapes(logits: Tensor, targets: Tensor, masked: Tensor) -> None:
    if logits.dim() != 3 or logits.shape[:2] != targets.shape or masked.shape != targets.shape:
        raise ValueError(
            f"expected logits [B, T, V] with targets and masked [B, T]; got logits {tuple(logits.shape)}, "
            f"targets {tuple(targets.shape)}, masked {tuple(masked.shape)}"
        )
