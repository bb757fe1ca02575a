"""The data-driven soft-mask gate centre: pass-1 confidence at masked positions, and its quantile."""

from __future__ import annotations

import math

import pytest
import torch

from _training_helpers import MASK_ID, PAD_ID, random_examples, tiny_model
from softmask_ext.data import stdlib_dataset
from softmask_ext.finetune import SHIPPED_MODEL
from softmask_ext.model import DreamModel, load_tokenizer
from softmask_ext.soft_mask import SoftMask
from softmask_ext.training import FINETUNE_NOISE, confidence_centre, masked_neg_entropy


def test_masked_neg_entropy_is_one_value_per_masked_position_in_range_and_repeatable():
    model = tiny_model().train()
    data = random_examples(16)
    values = masked_neg_entropy(model, data, MASK_ID, PAD_ID, FINETUNE_NOISE, batch_size=4, batches=3, seed=1)
    assert values.dtype == torch.float32 and values.dim() == 1 and values.numel() >= 3 * 4  # >= 1 mask per row
    assert bool((values <= 1e-6).all()) and bool((values >= -math.log(model.config.vocab_size) - 1e-4).all())
    again = masked_neg_entropy(model, data, MASK_ID, PAD_ID, FINETUNE_NOISE, batch_size=4, batches=3, seed=1)
    assert torch.equal(values, again) and model.training  # same batches and noise; the mode is restored


def test_confidence_centre_is_the_quantile_of_the_finite_values_and_stays_negative():
    values = torch.tensor([-5.0, -4.0, -3.0, -2.0, -1.0, float("nan")])
    assert confidence_centre(values) == pytest.approx(-3.0)
    assert confidence_centre(values, quantile=0.75) == pytest.approx(-2.0)
    assert confidence_centre(torch.zeros(4)) == -1e-3  # a fully confident model: the gate constraint still holds
    with pytest.raises(ValueError, match="quantile"):
        confidence_centre(values, quantile=1.0)
    with pytest.raises(ValueError, match="no finite"):
        confidence_centre(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="calibration batch"):
        masked_neg_entropy(tiny_model(), random_examples(4), MASK_ID, PAD_ID, FINETUNE_NOISE, batch_size=2,
                           batches=0)


@pytest.mark.skipif(not (SHIPPED_MODEL / "model.safetensors").exists(), reason="the tiny model has not been built yet")
def test_shipped_model_centre_opens_the_gate_that_the_papers_centre_keeps_closed():
    """On the shipped model's real pass-1 predictions: the paper's gate (centre -0.75) passes almost nothing, the
    calibrated one passes about half of the masked positions of other batches."""
    model = DreamModel.from_pretrained(SHIPPED_MODEL, dtype=torch.float32)
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    data = stdlib_dataset(tokenizer, "train", 128, max_chars=400_000)
    common = dict(mask_token_id=model.config.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                  noise=FINETUNE_NOISE, batch_size=8, batches=4)
    centre = confidence_centre(masked_neg_entropy(model, data, **common, seed=0))
    held_out = masked_neg_entropy(model, data, **common, seed=1)
    assert centre < -2.0

    def gate(centre: float) -> float:  # mean lam at scale 1: the share the gate lets through
        return float(SoftMask(scale=1.0, centre=centre).lam(held_out).detach().mean())

    assert gate(-0.75) < 1e-4
    assert 0.35 < float((held_out > centre).float().mean()) < 0.65
    assert 0.3 < gate(centre) < 0.7
