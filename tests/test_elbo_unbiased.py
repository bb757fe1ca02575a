"""The ELBO estimate is unbiased: its mean over draws matches the bound computed exactly by enumerating every mask."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from _training_helpers import MASK_ID, tiny_model

from softmask_ext.diffusion.noise import NoiseSchedule
from softmask_ext.evaluation import estimate_elbo

T = 0.3  # one noise level (t_min = t_max), so the bound is a finite sum over the 2^3 masks of 3 response tokens


def _masked_loss(model, ids, masked):
    """sum over masked positions of -log p(x_i) / t, Dream's shift (row i-1 predicts position i)."""
    x_t = ids.masked_fill(masked, MASK_ID)
    with torch.no_grad():
        logits = model(input_ids=x_t).logits[0].float()
    rows = torch.cat([logits[:1], logits[:-1]])
    positions = masked[0].nonzero().flatten()
    return float(F.cross_entropy(rows[positions], ids[0, positions], reduction="sum")) / T


def test_elbo_mean_matches_exact_enumeration_and_forcing_a_mask_would_not():
    torch.manual_seed(0)
    model = tiny_model().eval()
    ids = torch.tensor([[5, 17, 23, 42]])
    prompt = torch.tensor([[True, False, False, False]])
    exact, forced = 0.0, 0.0
    singles = []
    for pattern in itertools.product([False, True], repeat=3):
        masked = torch.tensor([[False, *pattern]])
        k = sum(pattern)
        probability = T**k * (1 - T) ** (3 - k)
        loss = _masked_loss(model, ids, masked) if k else 0.0
        exact += probability * loss
        forced += probability * loss
        if k == 1:
            singles.append(loss)
    forced += (1 - T) ** 3 * sum(singles) / 3  # what forcing one (uniform) mask into an empty draw would add
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "prompt_mask": prompt}
    result = estimate_elbo(model, [batch], MASK_ID, num_samples=160, schedule=NoiseSchedule(T, T), progress=False)
    draws = result.draws[0]
    mean = statistics.fmean(draws)
    standard_error = statistics.stdev(draws) / math.sqrt(len(draws))
    assert result.nll_bound * result.num_tokens == pytest.approx(mean)  # per token: over the 3 response tokens
    assert abs(mean - exact) < 3 * standard_error
    assert abs(mean - forced) > 4 * standard_error  # the test tells the biased estimator apart
    assert draws.count(0.0) > 0  # draws that masked nothing count as 0
