"""Data-driven initialisation of the soft-mask gate centre.

``lam = scale * sigmoid(steepness * (negH - centre))`` only passes a gradient to ``scale`` at positions whose
confidence ``negH`` is not far below ``centre``. The paper's centre (-0.75 nats) suits Dream-7B, whose predictions
are confident; a weak model's predictions at masked positions can sit several nats lower (the shipped tiny model's
median is about -3.4), where the paper's gate passes little and SM is slow to start. Centring the gate on a quantile
of the base model's own pass-1 confidence (``--sm-init-centre auto``) opens it for that share of the masked positions.

Whether SM can start at all from the paper's scale of ~1e-6 is decided by the sign of the loss gradient with respect to
the scale there (the model has never seen a soft input, so nothing else moves it): :func:`scale_gradient` measures it
per training batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import ops
from ..data import BatchStream, Example
from ..diffusion.noise import NoisedBatch, NoiseSchedule, sample_noise, stream_generator
from ..diffusion.objective import masked_token_loss
from ..diffusion.two_pass import model_logits, soft_mask_forward
from ..model.family import family_of, prediction_row_index
from ..soft_mask import SoftMask

__all__ = ["masked_neg_entropy", "confidence_centre", "scale_gradient"]

_CALIBRATION_STREAM = 5  # a random stream of its own (the trainer's streams are 1-4): training noise is unchanged


class _CalibrationBatch(NamedTuple):
    ids: Tensor  # int64 [B, T], the clean tokens
    attention: Tensor | None  # [B, T], or None when nothing is padded
    response_tokens: int  # tokens that could have been masked (the loss normaliser)
    noised: NoisedBatch
    first: Tensor  # pass-1 logits [N, V] of the rows that predict the N masked positions (the family's shift)


def _calibration_batches(
    model: nn.Module,
    data: Sequence[Example],
    mask_token_id: int,
    pad_token_id: int,
    noise: NoiseSchedule,
    batch_size: int,
    batches: int,
    seed: int,
) -> Iterator[_CalibrationBatch]:
    """The first ``batches`` training batches (same data order as training for ``seed``), noised as in training but
    from a random stream of their own, with their pass-1 logits (no gradient); the model is in eval mode meanwhile."""
    if batches < 1:
        raise ValueError(f"need at least one batch, got {batches} calibration batches")
    device = next(model.parameters()).device
    logit_shift = family_of(model).logit_shift
    was_training = model.training
    model.eval()
    try:
        stream = BatchStream(data, batch_size, pad_token_id, seed=seed)
        for index in range(batches):
            batch = next(stream)
            ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            response = ~batch["prompt_mask"].to(device)
            noised = sample_noise(
                ids, response, mask_token_id, noise, stream_generator(seed, _CALIBRATION_STREAM, index)
            )
            attention = None if bool(attention.all()) else attention
            batch_idx, pos_idx = noised.masked.nonzero(as_tuple=True)
            rows = batch_idx * ids.shape[1] + prediction_row_index(pos_idx, logit_shift)
            with torch.no_grad():
                first = model_logits(model, input_ids=noised.x_t, attention_mask=attention, logits_rows=rows)
            yield _CalibrationBatch(ids, attention, int(response.sum()), noised, first)
    finally:
        model.train(was_training)


@torch.no_grad()
def masked_neg_entropy(
    model: nn.Module,
    data: Sequence[Example],
    mask_token_id: int,
    pad_token_id: int,
    noise: NoiseSchedule,
    *,
    batch_size: int,
    batches: int = 8,
    seed: int = 0,
) -> Tensor:
    """Pass-1 negative entropy (fp32 ``[N]``, nats) at the masked positions of the first ``batches`` training batches.

    The batches are the ones training starts with (same data order for ``seed``), noised as in training but from a
    random stream of their own; the logits row predicting each position follows the model family's ``logit_shift``.
    """
    return torch.cat(
        [
            ops.topk_entropy(b.first, 1)[2].float().cpu()
            for b in _calibration_batches(model, data, mask_token_id, pad_token_id, noise, batch_size, batches, seed)
        ]
    )


def confidence_centre(neg_entropy: Tensor, quantile: float = 0.5) -> float:
    """The gate centre at the ``quantile`` of the confidence values (the median by default): below 0, as the gate's
    constraint needs (at most -1e-3); non-finite values are ignored."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    finite = neg_entropy[torch.isfinite(neg_entropy)]
    if finite.numel() == 0:
        raise ValueError("no finite confidence values to place the soft-mask gate centre on")
    return min(float(finite.quantile(quantile)), -1e-3)


def scale_gradient(
    model: nn.Module,
    soft_mask: SoftMask,
    data: Sequence[Example],
    mask_token_id: int,
    pad_token_id: int,
    noise: NoiseSchedule,
    *,
    batch_size: int,
    batches: int = 8,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Per batch, the gradient of the SM training loss with respect to ``transparency_scale``, and the top-1 accuracy
    of pass 1 at the masked positions: (fp64 ``[batches]``, fp64 ``[batches]``).

    The batches and noise are those of :func:`masked_neg_entropy`; the loss is the trainer's for an SM batch
    (two-pass forward, ``1/t`` weight, normalised by the batch's response tokens). Negative values mean that a larger
    scale lowers the loss. Neither the model nor ``soft_mask`` keeps a gradient.
    """
    grads, accuracy = [], []
    for b in _calibration_batches(model, data, mask_token_id, pad_token_id, noise, batch_size, batches, seed):
        accuracy.append(float((b.first.argmax(-1) == b.ids[b.noised.masked]).double().mean()))
        logits = soft_mask_forward(model, soft_mask, b.noised.x_t, b.attention, mask_token_id)
        loss = masked_token_loss(
            logits, b.ids, b.noised.masked, b.noised.t, b.response_tokens, family_of(model).logit_shift
        )
        (grad,) = torch.autograd.grad(loss, soft_mask.raw_scale)
        scale = float(soft_mask.scale.detach())
        grads.append(float(grad) / (scale * (1.0 - scale)))  # d sigmoid(raw) / d raw = s (1 - s)
    return torch.tensor(grads, dtype=torch.float64), torch.tensor(accuracy, dtype=torch.float64)
