"""MDLM's training objective (continuous time, log-linear noise, SUBS).

- Times: per sample, antithetic over the global batch of ``n``: ``u_i = (r_i / n + i / n) mod 1`` with uniform
  ``r_i`` (sample ``i`` lands in the ``i``-th stratum of width ``1/n``), then ``t = (1 - eps) u + eps``
  (``eps = 1e-3``). Each process and micro-batch takes its contiguous slice of the global batch's times.
- Noise: log-linear schedule ``alpha_t = 1 - (1 - eps) t``; each token is masked with probability ``1 - alpha_t``
  (no forced mask).
- Loss: ``-log p_theta(x_0) * (-alpha_t') / (1 - alpha_t)`` (= ``-log p / t``) per masked token, 0 elsewhere (SUBS
  carries unmasked tokens over), summed; callers normalise by the tokens.
- SM: the logits come from the shared two-pass forward (:mod:`softmask_ext.diffusion.two_pass`). Rows are aligned by
  the model family's logit shift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.family import prediction_row_index

__all__ = ["SAMPLING_EPS", "antithetic_times", "loglinear_alpha", "mask_tokens", "mdlm_loss"]

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


def mdlm_loss(logits: Tensor, x0: Tensor, t: Tensor, x_t: Tensor, mask_token_id: int, logit_shift: int) -> Tensor:
    """Summed MDLM loss ``sum -log p / t`` over the masked tokens of a batch (fp32 scalar).

    Args:
        logits: [B, T, V] the model's output on ``x_t`` (one pass, or pass 2 of the SM forward:
            :class:`softmask_ext.diffusion.two_pass.DiffusionTrainingForward`).
        x0: int64 [B, T] clean tokens; x_t: the noised tokens; t: fp32 [B] times.
        logit_shift: the model family's (``family_of(model).logit_shift``).
    """
    masked = x_t == mask_token_id
    batch_idx, pos_idx = masked.nonzero(as_tuple=True)
    rows = logits[batch_idx, prediction_row_index(pos_idx, logit_shift)].float()
    nll = F.cross_entropy(rows, x0[batch_idx, pos_idx], reduction="none")
    alpha, dalpha = loglinear_alpha(t.to(logits.device).float())
    weight = -dalpha / (1 - alpha)
    return (nll * weight[batch_idx]).sum()
