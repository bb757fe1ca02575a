"""The soft-mask start: pass-1 confidence at masked positions and its quantile (the gate centre), and the gradient of
the SM loss with respect to the scale."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from _training_helpers import MASK_ID, PAD_ID, random_examples, tiny_model

from softmask_ext.conventions import SHIPPED_MODEL
from softmask_ext.data import BatchStream, stdlib_dataset
from softmask_ext.finetune import initial_soft_mask
from softmask_ext.model import DreamModel, load_tokenizer
from softmask_ext.soft_mask import SoftMask
from softmask_ext.training import (
    FINETUNE_NOISE,
    confidence_centre,
    masked_neg_entropy,
    masked_token_loss,
    sample_noise,
    scale_gradient,
    soft_mask_forward,
    stream_generator,
)


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
        masked_neg_entropy(tiny_model(), random_examples(4), MASK_ID, PAD_ID, FINETUNE_NOISE, batch_size=2, batches=0)


@pytest.mark.skipif(not (SHIPPED_MODEL / "model.safetensors").exists(), reason="the tiny model has not been built yet")
def test_auto_centre_on_the_shipped_model_opens_the_gate_for_about_half_of_the_masked_positions():
    """On the shipped model's real pass-1 predictions: ``--sm-init-centre auto`` puts the centre at the median
    confidence, so the gate passes about half of the masked positions of other batches, more than the paper's centre
    (-0.75) passes."""
    model = DreamModel.from_pretrained(SHIPPED_MODEL, dtype=torch.float32)
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    data = stdlib_dataset(tokenizer, "train", 128, max_chars=400_000)
    settings = dict(
        sm_init_centre="auto",
        sm_init_scale=0.0,
        k=1,
        t_min=FINETUNE_NOISE.t_min,
        t_max=FINETUNE_NOISE.t_max,
        batch_size=8,
        seed=0,
    )
    soft_mask = initial_soft_mask(model, data, settings, verbose=False)
    centre = soft_mask.to_transparency_config()["transparency_centre"]
    held_out = masked_neg_entropy(
        model,
        data,
        mask_token_id=model.config.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        noise=FINETUNE_NOISE,
        batch_size=8,
        batches=16,
        seed=1,
    )
    assert -6.0 < centre < -0.75

    def gate(centre: float) -> float:  # mean lam at scale 1: the share the gate lets through
        return float(SoftMask(scale=1.0, centre=centre).lam(held_out).detach().mean())

    assert 0.25 < float((held_out > centre).float().mean()) < 0.75  # t varies per batch: so does the share
    assert 0.2 < gate(centre) < 0.8 and gate(-0.75) < gate(centre)


def test_scale_gradient_matches_a_finite_difference_of_the_sm_loss():
    """The per-batch gradient with respect to the scale equals the slope of the SM training loss between two nearby
    scales, on the same batches and noise; the model keeps no gradient and its mode is restored."""
    model = tiny_model().train()
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)  # a sharp head: the random model's loss then responds to the blend
    data = random_examples(16)
    common = dict(mask_token_id=MASK_ID, pad_token_id=PAD_ID, noise=FINETUNE_NOISE, batch_size=4, batches=3, seed=2)
    grads, accuracy = scale_gradient(model, SoftMask(k=2, scale=0.3, centre=-3.0), data, **common)
    assert grads.shape == accuracy.shape == (3,) and bool(((accuracy >= 0) & (accuracy <= 1)).all())
    assert model.training and all(p.grad is None for p in model.parameters())
    step = 1e-3

    def losses(scale: float) -> torch.Tensor:  # the SM loss per batch, from the gradient's own batches and noise
        soft_mask = SoftMask(k=2, scale=scale, centre=-3.0)
        stream = BatchStream(data, 4, PAD_ID, seed=2)
        values = []
        for index in range(3):
            batch = next(stream)
            response = ~batch["prompt_mask"]
            noised = sample_noise(batch["input_ids"], response, MASK_ID, FINETUNE_NOISE, stream_generator(2, 5, index))
            with torch.no_grad():
                logits = soft_mask_forward(model.eval(), soft_mask, noised.x_t, batch["attention_mask"], MASK_ID)
                values.append(
                    float(
                        masked_token_loss(logits, batch["input_ids"], noised.masked, noised.t, int(response.sum()), 1)
                    )
                )
        return torch.tensor(values, dtype=torch.float64)

    slope = (losses(0.3 + step) - losses(0.3 - step)) / (2 * step)
    torch.testing.assert_close(grads, slope, rtol=2e-2, atol=1e-4)
    with pytest.raises(ValueError, match="at least one batch"):
        scale_gradient(model, SoftMask(), data, **{**common, "batches": 0})


@pytest.mark.skipif(not (SHIPPED_MODEL / "model.safetensors").exists(), reason="the tiny model has not been built yet")
def test_start_gradient_benchmark_on_the_shipped_model(tmp_path):
    """experiments/sm_start_gradient.py end to end, few batches: one row per centre, written as JSON."""
    path = Path(__file__).resolve().parents[1] / "experiments" / "sm_start_gradient.py"
    spec = importlib.util.spec_from_file_location("sm_start_gradient", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "grad.json"
    rows = script.main(["--batches", "2", "--batch-size", "2", "--max-chars", "300000", "--out", str(out)])
    assert [r["centre"] for r in rows] == [-0.75, "auto"] and json.loads(out.read_text())["rows"] == rows
    assert rows[1]["centre_value"] < 0 and all(math.isfinite(r["dL_dscale_mean"]) for r in rows)
    assert all(0.0 <= r["pass1_top1_accuracy"] <= 1.0 for r in rows)
