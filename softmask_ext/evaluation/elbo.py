"""Validation perplexity bound of a masked diffusion LM: the MDLM ELBO, estimated by Monte Carlo over t.

For a linear schedule the negative ELBO per token is ``E_t[ sum_{masked i} CE_i / t ] / N``; ``exp`` of it bounds the
perplexity. Each draw masks every token with probability ``t`` independently (prompts never) and
:func:`softmask_ext.diffusion.objective.masked_token_loss` gives the ``1/t``-weighted cross-entropy with the rows
the model family's ``logit_shift`` names. A row whose draw masked nothing contributes 0, as in the bound: unlike
training, no mask is forced into it, so the estimate is unbiased (``estimator`` in the result says so). Forcing one
would add, with probability ``(1 - t)^n`` for a row of ``n`` tokens, one token's cross-entropy over ``t``: rare,
since it needs a small ``t``, but heavy (about +1% perplexity at length 256 and +4% at 128 in expectation with
``t ~ U[1e-3, 1]``). For a soft-masked model the logits come from the two-pass SM forward
(:func:`softmask_ext.diffusion.two_pass.soft_mask_forward`), as the paper evaluates its SM models.

Sampling. Each batch gets ``R = num_samples`` draws of one ``t`` for the whole batch (as in training), stratified:
draw ``r`` is uniform in the r-th of R equal slices of ``[t_min, t_max]``, which keeps the estimate unbiased and
removes most of the variance the ``1/t`` weight brings at small ``t``. Every (batch, draw) pair has its own generator,
seeded by ``(seed, stream, index)``, so the estimate is reproducible, independent of batch order and device, and
two evaluations with the same seed and batches see identical noise: they can be compared pairwise
(:func:`paired_difference`), which is far more precise than comparing two intervals.

Interval. Given the fixed validation set, batches are independent; the 95% interval uses the variance
``sum_b Var_r(X_br) / (R N^2)`` with the R draws of a batch treated as independent. Stratified draws vary less than
that, so the interval is conservative. Normal quantile: the sum runs over many batches.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..conventions import RandomStream
from ..diffusion.noise import PRETRAIN_NOISE, NoiseSchedule, stream_generator
from ..diffusion.objective import masked_token_loss
from ..diffusion.two_pass import model_logits, soft_mask_forward
from ..model.family import family_of
from ..soft_mask import SoftMask

__all__ = ["ElboResult", "ELBO_STREAM", "ESTIMATOR", "estimate_elbo", "paired_difference"]

#: Random-stream id of ELBO evaluation noise (training uses its own streams).
ELBO_STREAM = RandomStream.ELBO

#: What :func:`estimate_elbo` computes, recorded in every result.
ESTIMATOR = "unbiased: Monte Carlo over t and masks, no forced mask"

_Z95 = statistics.NormalDist().inv_cdf(0.975)


@dataclass(frozen=True)
class ElboResult:
    """Negative ELBO per token (nats) with its 95% Monte Carlo interval, and the perplexity bound ``exp`` of both.

    ``draws[b][r]``: the ``1/t``-weighted cross-entropy summed over batch ``b`` under draw ``r`` (nats).
    ``estimator``: how the bound was estimated (:data:`ESTIMATOR`).
    """

    nll_bound: float
    nll_ci95: tuple[float, float]
    perplexity_bound: float
    perplexity_ci95: tuple[float, float]
    num_tokens: int
    num_batches: int
    num_samples: int
    soft_mask: bool
    t_min: float
    t_max: float
    seed: int
    draws: tuple[tuple[float, ...], ...]
    estimator: str = ESTIMATOR

    def to_dict(self) -> dict:
        return asdict(self)


def _stratified_t(schedule: NoiseSchedule, r: int, num_samples: int, generator: torch.Generator) -> float:
    """Draw ``r`` of ``num_samples``: uniform within the r-th of ``num_samples`` equal slices of [t_min, t_max]."""
    u = (r + torch.rand((), generator=generator, dtype=torch.float64).item()) / num_samples
    return schedule.t_min + (schedule.t_max - schedule.t_min) * u


def _mean_and_half_width(draws: Sequence[Sequence[float]], num_tokens: int) -> tuple[float, float]:
    """Per-token mean over all draws, and the 95% half-width of the estimator (see the module docstring)."""
    num_samples = len(draws[0])
    mean = sum(map(sum, draws)) / num_samples / num_tokens
    variance = sum(statistics.variance(d) for d in draws) / num_samples / num_tokens**2
    return mean, _Z95 * math.sqrt(variance)


def estimate_elbo(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    mask_token_id: int,
    *,
    num_samples: int = 8,
    seed: int = 0,
    soft_mask: SoftMask | None = None,
    schedule: NoiseSchedule = PRETRAIN_NOISE,
    progress: bool = True,
) -> ElboResult:
    """Monte Carlo estimate of the negative ELBO per token over ``batches``.

    batches: dicts with ``input_ids`` int64 [B, T], ``attention_mask`` bool [B, T] and optionally ``prompt_mask``
        bool [B, T] (True: never noised, not counted), as :func:`softmask_ext.data.collate` makes them.
    num_samples: noise draws per batch (>= 2, for the interval).
    soft_mask: evaluate with the two-pass SM forward using these SM parameters (on the model's device);
        None: one plain pass.
    schedule: the range of t (default the MDLM ELBO's [1e-3, 1]).
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to give a confidence interval, got {num_samples}")
    device = next(model.parameters()).device
    logit_shift = family_of(model).logit_shift
    draws: list[tuple[float, ...]] = []
    num_tokens = 0
    was_training = model.training
    model.eval()
    try:
        for b, batch in enumerate(tqdm(list(batches), desc="elbo", disable=not progress)):
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            response = attention_mask.bool()
            if "prompt_mask" in batch:
                response &= ~batch["prompt_mask"].to(device)
            num_tokens += int(response.sum())
            mask_arg = None if bool(attention_mask.all()) else attention_mask
            batch_draws = []
            for r in range(num_samples):
                generator = stream_generator(seed, ELBO_STREAM, b * num_samples + r)
                t = _stratified_t(schedule, r, num_samples, generator)
                masked = (torch.rand(input_ids.shape, generator=generator) < t).to(device) & response
                if not bool(masked.any()):  # nothing masked: this draw's term of the bound is 0
                    batch_draws.append(0.0)
                    continue
                x_t = input_ids.masked_fill(masked, mask_token_id)
                with torch.no_grad():
                    if soft_mask is None:
                        logits = model_logits(model, input_ids=x_t, attention_mask=mask_arg)
                    else:
                        logits = soft_mask_forward(model, soft_mask, x_t, mask_arg, mask_token_id)
                    loss = masked_token_loss(logits, input_ids, masked, t, 1, logit_shift)
                batch_draws.append(float(loss))
            draws.append(tuple(batch_draws))
    finally:
        model.train(was_training)
    if not draws:
        raise ValueError("no validation batches to evaluate")
    nll, half = _mean_and_half_width(draws, num_tokens)
    return ElboResult(
        nll_bound=nll,
        nll_ci95=(nll - half, nll + half),
        perplexity_bound=math.exp(nll),
        perplexity_ci95=(math.exp(nll - half), math.exp(nll + half)),
        num_tokens=num_tokens,
        num_batches=len(draws),
        num_samples=num_samples,
        soft_mask=soft_mask is not None,
        t_min=schedule.t_min,
        t_max=schedule.t_max,
        seed=seed,
        draws=tuple(draws),
    )


def paired_difference(a: ElboResult | Mapping, b: ElboResult | Mapping) -> dict[str, float | list[float]]:
    """``a - b`` in nats per token with a 95% interval, from two estimates made on identical noise.

    Both must come from the same batches, seed, number of draws and t range (results or their ``to_dict()``).
    """
    a, b = (x.to_dict() if isinstance(x, ElboResult) else dict(x) for x in (a, b))
    for key in ("num_tokens", "num_batches", "num_samples", "seed", "t_min", "t_max", "estimator"):
        if a.get(key) != b.get(key):
            raise ValueError(f"the two estimates differ in {key} ({a[key]} vs {b[key]}): they saw different noise")
    differences = [[x - y for x, y in zip(da, db)] for da, db in zip(a["draws"], b["draws"])]
    mean, half = _mean_and_half_width(differences, a["num_tokens"])
    return {"difference": mean, "ci95": [mean - half, mean + half]}
