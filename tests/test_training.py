"""Noise schedule, objective and the two-pass SM forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _training_helpers import MASK_ID, tiny_model
from hypothesis import given
from hypothesis import strategies as st

from softmask_ext import SoftMask
from softmask_ext.training import (
    AdapterConfig,
    NoiseSchedule,
    apply_adapters,
    apply_noise,
    masked_token_loss,
    sample_noise,
    shift_logits,
    soft_mask_forward,
    stream_generator,
)


# ------------------------------------------------------------------------------------------------------ noise
@st.composite
def batches(draw):
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 50, (b, t), generator=g)
    prompt_len = torch.randint(0, t, (b,), generator=g)
    pad_from = torch.stack([torch.randint(int(p) + 1, t + 1, (), generator=g) for p in prompt_len])
    pos = torch.arange(t)
    response = (pos >= prompt_len[:, None]) & (pos < pad_from[:, None])
    return ids, response


@given(batches(), st.floats(0.0, 1.0), st.integers(0, 10**6))
def test_noise_masks_only_responses_and_at_least_one_per_row(batch, u, seed):
    ids, response = batch
    schedule = NoiseSchedule(0.2, 0.8)
    noised = sample_noise(ids, response, MASK_ID, schedule, torch.Generator().manual_seed(seed))
    assert 0.2 <= noised.t <= 0.8 and noised.loss_weight == pytest.approx(1 / noised.t)
    assert not (noised.masked & ~response).any(), "a prompt or padding token was masked"
    assert noised.masked.any(dim=1).all(), "a row has no masked token"
    assert torch.equal(noised.x_t[noised.masked], torch.full_like(ids[noised.masked], MASK_ID))
    assert torch.equal(noised.x_t[~noised.masked], ids[~noised.masked])


def test_noise_rate_matches_t_and_is_reproducible():
    ids = torch.randint(2, 50, (64, 256))
    response = torch.ones_like(ids, dtype=torch.bool)
    response[:, :32] = False
    for t in (0.05, 0.3, 0.9):
        noised = apply_noise(ids, response, MASK_ID, t, stream_generator(0, 1, 7))
        rate = noised.masked[response].float().mean().item()
        assert rate == pytest.approx(t, abs=0.01)
        again = apply_noise(ids, response, MASK_ID, t, stream_generator(0, 1, 7))
        assert torch.equal(noised.masked, again.masked)
    other = apply_noise(ids, response, MASK_ID, 0.3, stream_generator(0, 1, 8))
    assert not torch.equal(other.masked, apply_noise(ids, response, MASK_ID, 0.3, stream_generator(0, 1, 7)).masked)


def test_noise_t_is_uniform_on_its_range():
    schedule = NoiseSchedule(1e-3, 1.0)
    ts = torch.tensor([schedule.sample(stream_generator(3, 1, i)) for i in range(2000)])
    assert ts.min() >= 1e-3 and ts.max() <= 1.0
    assert ts.mean().item() == pytest.approx(0.5005, abs=0.02)


@pytest.mark.parametrize("bad", [(0.0, 0.5), (0.5, 0.2), (0.1, 1.5)])
def test_noise_schedule_rejects_bad_ranges(bad):
    with pytest.raises(ValueError, match="t_min"):
        NoiseSchedule(*bad)


def test_noise_rejects_rows_without_response_tokens():
    ids = torch.randint(2, 50, (2, 8))
    response = torch.ones_like(ids, dtype=torch.bool)
    response[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\] have no response tokens"):
        sample_noise(ids, response, MASK_ID, NoiseSchedule(), torch.Generator())


# ------------------------------------------------------------------------------------------------------ objective
def test_loss_uses_dream_shift_weight_and_per_token_normalisation():
    torch.manual_seed(1)
    logits = torch.randn(2, 7, 11)
    targets = torch.randint(0, 11, (2, 7))
    masked = torch.zeros(2, 7, dtype=torch.bool)
    masked[0, [0, 3]] = True
    masked[1, 6] = True
    t, n = 0.4, 10
    shifted = shift_logits(logits, 1)
    expected = sum(F.cross_entropy(shifted[b, i], targets[b, i]) for b, i in masked.nonzero().tolist()) / t / n
    got = masked_token_loss(logits, targets, masked, t, n, 1)
    torch.testing.assert_close(got, expected)
    # Position 0 is predicted from row 0 itself (the shift repeats the first row).
    only_first = torch.zeros_like(masked)
    only_first[0, 0] = True
    torch.testing.assert_close(
        masked_token_loss(logits, targets, only_first, 1.0, 1, 1), F.cross_entropy(logits[0, 0], targets[0, 0])
    )


def test_loss_is_computed_in_fp32_from_bf16_logits():
    logits = torch.randn(1, 5, 9).bfloat16()
    targets = torch.randint(0, 9, (1, 5))
    masked = torch.ones(1, 5, dtype=torch.bool)
    out = masked_token_loss(logits, targets, masked, 0.5, 5, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, masked_token_loss(logits.float(), targets, masked, 0.5, 5, 1))


def test_loss_rejects_bad_shapes_and_t():
    with pytest.raises(ValueError, match="expected logits"):
        masked_token_loss(
            torch.randn(2, 5), torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool), 0.5, 1, 1
        )
    with pytest.raises(ValueError, match="t must be in"):
        masked_token_loss(
            torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool), 0.0, 1, 1
        )


# ------------------------------------------------------------------------------------------------------ two-pass SM
def _active_soft_mask() -> SoftMask:
    """SM parameters where lam is far from zero for an untrained model (high-entropy predictions)."""
    return SoftMask(k=2, scale=0.6, steepness=1.0, centre=-6.0)


def _noised(vocab=64, seed=0):
    ids = torch.randint(2, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
    return ids, apply_noise(ids, torch.ones_like(ids, dtype=torch.bool), MASK_ID, 0.5, stream_generator(seed, 1, 0))


def test_soft_mask_forward_is_pass2_on_blended_embeddings_of_pass1():
    model, sm = tiny_model(), _active_soft_mask()
    _, noised = _noised()
    with torch.no_grad():
        first = model(input_ids=noised.x_t).logits
        embeds = sm.build_embeddings(noised.x_t, first, model.get_input_embeddings().weight, MASK_ID, logit_shift=1)
        expected = model(inputs_embeds=embeds).logits
        got = soft_mask_forward(model, sm, noised.x_t, None, MASK_ID)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, first), "soft masks changed nothing"


def test_pass1_builds_no_graph_and_gradients_reach_sm_parameters_and_embeddings():
    model, sm = tiny_model(), _active_soft_mask()
    ids, noised = _noised()
    seen = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.requires_grad))
    logits = soft_mask_forward(model, sm, noised.x_t, None, MASK_ID)
    assert seen == [False, True], "pass 1 must run without autograd, pass 2 with it"
    masked_token_loss(logits, ids, noised.masked, noised.t, ids.numel(), 1).backward()
    for name in ("raw_scale", "raw_steepness", "raw_centre"):
        grad = getattr(sm, name).grad
        assert grad is not None and grad.abs() > 0, f"no gradient reached {name}"
    table = model.get_input_embeddings().weight.grad
    assert table is not None and table[MASK_ID].abs().sum() > 0, "no gradient reached the mask embedding"


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_gradients_reach_adapters_through_pass2(kind):
    peft_model = apply_adapters(tiny_model(), AdapterConfig(kind=kind, rank=4, alpha=8.0))
    sm = _active_soft_mask()
    ids, noised = _noised()
    for p in peft_model.parameters():  # start from non-zero B so every adapter matrix gets a gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    logits = soft_mask_forward(peft_model, sm, noised.x_t, None, MASK_ID)
    masked_token_loss(logits, ids, noised.masked, noised.t, ids.numel(), 1).backward()
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(any(k in n for k in ("lora_", "magnitude")) for n in trainable)
    assert sum("q_proj" in n for n in trainable) and sum("o_proj" in n for n in trainable)
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"adapter {name} got no gradient"
    frozen = [p for p in peft_model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    assert sm.raw_scale.grad is not None and sm.raw_scale.grad.abs() > 0
