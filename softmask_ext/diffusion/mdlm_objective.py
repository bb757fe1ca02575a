"""MDLM's training objective (continuous time, log-linear noise, SUBS) and its soft-masked two-pass form.

- Times: per sample, antithetic over the global batch of ``n``: ``u_i = (r_i / n + i / n) mod 1`` with uniform
  ``r_i`` (sample ``i`` lands in the ``i``-th stratum of width ``1/n``), then ``t = (1 - eps) u + eps``
  (``eps = 1e-3``). Each process and micro-batch takes its contiguous slice of the global batch's times.
- Noise: log-linear schedule ``alpha_t = 1 - (1 - eps) t``; each token is masked with probability ``1 - alpha_t``
  (no forced mask).
- Loss: ``-log p_theta(x_0) * (-alpha_t') / (1 - alpha_t)`` (= ``-log p / t``) per masked token, 0 elsewhere (SUBS
  carries unmasked tokens over), summed and normalised by the valid tokens.
- SM (two passes): pass 1 without gradient on ``x_t``; its logits build the SM embeddings of the masked positions;
  pass 2 with gradient on them. Rows are aligned by the model family's logit shift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.family import family_of, prediction_row_index
from ..soft_mask import SoftMask

__all__ = ["SAMPLING_EPS", "antithetic_times", "loglinear_alpha", "mask_tokens", "mdlm_nll", "soft_inputs"]

SAMPLING_EPS = 1e-3


def antithetic_times(n: int, generator: torch.Generator, eps: float = SAMPLING_EPS) -> Tensor:
    """fp32 [n]: MDLM's per-sample antithetic times, one stratum of width ``1/n`` per sample, in ``[eps, 1)``."""
    if n < 1:
        raise ValueError(f"need at least one sample, got {n}")
    u = torch.rand(n, generator=generator)
    u = (u / n + torch.arange(n) / n) % 1
    return (1 - eps) * u + eps


def loglinear_alpha(t: Tensor, eps: float = SAMPLING_EPS) -> tuple[Tensor, float]:
    """``(alpha_t, alpha_t')`` of the log-linear schedule: ``alpha_t = 1 - (1 - eps) t``."""
    return 1 - (1 - eps) * t, -(1 - eps)


def mask_tokens(
    x0: Tensor, t: Tensor, mask_token_id: int, generator: torch.Generator, valid: Tensor | None = None
) -> Tensor:
    """``x_t``: each (valid) token of ``x0`` [B, T] masked with probability ``1 - alpha_t`` of its row's ``t`` [B]."""
    alpha, _ = loglinear_alpha(t)
    move = torch.rand(x0.shape, generator=generator) < (1 - alpha)[:, None]
    move = move.to(x0.device)
    if valid is not None:
        move &= valid
    return x0.masked_fill(move, mask_token_id)


def soft_inputs(
    model: nn.Module, soft_mask: SoftMask, x_t: Tensor, mask_token_id: int, attention_mask: Tensor | None = None
) -> Tensor:
    """SM input embeddings [B, T, D] for ``x_t`` from a gradient-free first pass (rows aligned by the family's
    shift); differentiable w.r.t. the embedding table and the SM parameters."""
    with torch.no_grad():
        first = model(input_ids=x_t, attention_mask=attention_mask).logits
    batch, length = x_t.shape
    rows = prediction_row_index(torch.arange(length, device=x_t.device), family_of(model).logit_shift)
    rows = (torch.arange(batch, device=x_t.device)[:, None] * length + rows).reshape(-1)
    embedding = model.get_input_embeddings()
    soft = soft_mask.soft_rows(first, rows, x_t.reshape(-1), embedding.weight, mask_token_id)
    return soft.view(batch, length, -1)


def mdlm_nll(
    model: nn.Module,
    x0: Tensor,
    t: Tensor,
    x_t: Tensor,
    valid: Tensor | None = None,
    soft_mask: SoftMask | None = None,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed MDLM loss of a batch and its number of valid tokens.

    Args:
        x0: int64 [B, T] clean tokens; x_t: the noised tokens; t: fp32 [B] times.
        valid: bool [B, T] tokens that count (default all).
        soft_mask: run the two-pass SM forward with this module; None: one plain pass.

    Returns:
        (fp32 scalar ``sum -log p / t`` over masked valid tokens, int64 scalar number of valid tokens).
    """
    mask_token_id = model.config.mask_token_id
    if soft_mask is not None:
        logits = model(
            inputs_embeds=soft_inputs(model, soft_mask, x_t, mask_token_id, attention_mask),
            attention_mask=attention_mask,
        ).logits
    else:
        logits = model(input_ids=x_t, attention_mask=attention_mask).logits
    masked = x_t == mask_token_id
    if valid is not None:
        masked &= valid
    batch_idx, pos_idx = masked.nonzero(as_tuple=True)
    rows = logits[batch_idx, prediction_row_index(pos_idx, family_of(model).logit_shift)].float()
    nll = F.cross_entropy(rows, x0[batch_idx, pos_idx], reduction="none")
    alpha, dalpha = loglinear_alpha(t.to(logits.device).float())
    weight = -dalpha / (1 - alpha)
    total = (nll * weight[batch_idx]).sum()
    count = valid.sum() if valid is not None else torch.tensor(x0.numel(), device=x0.device)
    return total, count
