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
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..model.family import prediction_row_index

__all__ = ["prediction_rows", "masked_token_loss"]


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
    if logits.dim() != 3 or logits.shape[:2] != targets.shape or masked.shape != targets.shape:
        raise ValueError(
            f"expected logits [B, T, V] with targets and masked [B, T]; got logits {tuple(logits.shape)}, "
            f"targets {tuple(targets.shape)}, masked {tuple(masked.shape)}"
        )
    if not 0.0 < t <= 1.0:
        raise ValueError(f"masking probability t must be in (0, 1], got {t}")
    rows = prediction_rows(logits, masked, logit_shift).float()
    token_loss = F.cross_entropy(rows, targets[masked], reduction="sum")
    return token_loss / t / num_tokens
