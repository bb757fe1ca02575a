"""The forward (noising) process of masked diffusion training.

One noise level ``t`` is drawn per batch; every response token is then replaced by the mask token independently with
probability ``t``. Prompt tokens and padding are never masked. A row whose draw masked nothing gets one response
token masked anyway (chosen uniformly), so every row contributes to the loss. The loss weight of the MDLM ELBO for a
linear schedule is ``1 / t``.

Randomness comes from an explicit ``torch.Generator`` so that training, resumption and evaluation can replay the
exact same noise (see :func:`stream_generator`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "NoiseSchedule",
    "FINETUNE_NOISE",
    "PRETRAIN_NOISE",
    "NoisedBatch",
    "apply_noise",
    "sample_noise",
    "stream_generator",
]


@dataclass(frozen=True)
class NoiseSchedule:
    """Uniform distribution of the per-batch masking probability ``t`` on ``[t_min, t_max]``."""

    t_min: float = 0.2
    t_max: float = 0.8

    def __post_init__(self) -> None:
        if not 0.0 < self.t_min <= self.t_max <= 1.0:
            raise ValueError(
                f"noise schedule needs 0 < t_min <= t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}"
            )

    def sample(self, generator: torch.Generator) -> float:
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        return self.t_min + (self.t_max - self.t_min) * u

    def sample_rows(self, rows: int, generator: torch.Generator) -> Tensor:
        """float64 ``[rows]``: one ``t`` per sequence (the authors' Dream recipe, one sequence per micro-batch)."""
        return self.t_min + (self.t_max - self.t_min) * torch.rand(rows, generator=generator, dtype=torch.float64)


#: The authors' fine-tuning range (Dream SM fine-tuning).
FINETUNE_NOISE = NoiseSchedule(0.2, 0.8)
#: MDLM pretraining / ELBO range: t ~ U[1e-3, 1].
PRETRAIN_NOISE = NoiseSchedule(1e-3, 1.0)


@dataclass
class NoisedBatch:
    """A noised batch.

    x_t:         int64 [B, T], the input with masked positions set to the mask token id
    masked:      bool  [B, T], positions replaced by the mask (a subset of the response positions)
    t:           the noise level: a python float in (0, 1] for the whole batch, or float64 [B], one per sequence
    loss_weight: ``1 / t``, the ELBO weight of every masked token
    """

    x_t: Tensor
    masked: Tensor
    t: float | Tensor

    @property
    def loss_weight(self) -> float | Tensor:
        return 1.0 / self.t


def stream_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator for draw number ``index`` of random stream ``stream`` under run seed ``seed``.

    Seeding each micro-batch from (seed, stream, index) makes its randomness independent of which process draws it
    and of how many were drawn before: multi-process runs, resumed runs and uninterrupted runs see the same noise.
    """
    state = np.random.SeedSequence([seed, stream, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _check_batch(input_ids: Tensor, response_mask: Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise TypeError(f"input_ids must be an int64 [B, T] tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
    if response_mask.shape != input_ids.shape or response_mask.dtype != torch.bool:
        raise TypeError(
            f"response_mask must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}, "
            f"got {response_mask.dtype} {tuple(response_mask.shape)}"
        )
    empty = (~response_mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"rows {empty.tolist()} have no response tokens: nothing to noise or to learn from")


def apply_noise(
    input_ids: Tensor,
    response_mask: Tensor,
    mask_token_id: int,
    t: float | Tensor,
    generator: torch.Generator,
    mask_eps: float = 0.0,
) -> NoisedBatch:
    """Mask each response token with probability ``(1 - mask_eps) * t + mask_eps`` (at least one per row).

    input_ids:     int64 [B, T]
    response_mask: bool  [B, T], True where a token may be masked (response tokens; never prompt or padding)
    t:             the noise level, a float for the batch or a float64 tensor [B] (one per sequence)
    mask_eps:      the floor of the masking probability (the authors' Dream recipe: 1e-3)
    """
    _check_batch(input_ids, response_mask)
    per_row = isinstance(t, Tensor)
    if per_row and tuple(t.shape) != (input_ids.shape[0],):
        raise ValueError(f"a per-sequence t must have shape [{input_ids.shape[0]}], got {list(t.shape)}")
    if not bool(((t > 0.0) & (t <= 1.0)).all() if per_row else 0.0 < t <= 1.0):
        raise ValueError(f"masking probability t must be in (0, 1], got {t}")
    if not 0.0 <= mask_eps < 1.0:
        raise ValueError(f"mask_eps must be in [0, 1), got {mask_eps}")
    shape = input_ids.shape
    u = torch.rand(shape, generator=generator)
    probability = (1.0 - mask_eps) * (t[:, None] if per_row else t) + mask_eps
    masked = (u < probability) & response_mask.cpu()
    # Rows where nothing was masked: mask one response position chosen uniformly (argmax of fresh uniforms).
    fallback = torch.rand(shape, generator=generator).masked_fill(~response_mask.cpu(), -1.0).argmax(dim=1)
    empty_rows = ~masked.any(dim=1)
    masked[empty_rows, fallback[empty_rows]] = True
    masked = masked.to(input_ids.device)
    x_t = input_ids.masked_fill(masked, mask_token_id)
    return NoisedBatch(x_t=x_t, masked=masked, t=t if per_row else float(t))


def sample_noise(
    input_ids: Tensor,
    response_mask: Tensor,
    mask_token_id: int,
    schedule: NoiseSchedule,
    generator: torch.Generator,
    per_sequence: bool = False,
    mask_eps: float = 0.0,
) -> NoisedBatch:
    """Draw ``t ~ U[t_min, t_max]`` once for the whole batch (or once per sequence), then :func:`apply_noise`."""
    t = schedule.sample_rows(input_ids.shape[0], generator) if per_sequence else schedule.sample(generator)
    return apply_noise(input_ids, response_mask, mask_token_id, t, generator, mask_eps)
