"""LLaDA's decoding in the engine, token for token against the transcription of its authors' ``generate``, on the
real `LLaDAModel` and on Dream's architecture under LLaDA's conventions."""

from __future__ import annotations

import pytest
import torch
from _llada_oracle import llada_generate, num_transfer_tokens
from test_decoding import SOFT_MASKS
from tiny_llada import tiny_model as tiny_llada

from softmask_ext import DreamConfig, DreamModel, SoftMask
from softmask_ext.decoding import diffusion_generate
from softmask_ext.model.dream import DecoderLayer
from softmask_ext.model.family import ModelFamily

MASK = 96


class NoShiftModel(DreamModel):
    """Dream's architecture under LLaDA's conventions (no logit shift, LLaDA's decoding keywords)."""

    family = ModelFamily(
        name="llada-conventions",
        model_types=(),
        logit_shift=0,
        load=DreamModel.from_pretrained,
        decoder_layer=DecoderLayer,
        default_decoding={"remasking": "low_confidence"},
    )


def no_shift_model(seed: int = 0) -> NoShiftModel:
    config = DreamConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        mask_token_id=MASK,
        pad_token_id=0,
        eos_token_id=0,
        bos_token_id=0,
    )
    torch.manual_seed(seed)
    model = NoShiftModel(config).eval()
    model.reset_parameters(std=0.3)
    return model


# LLaDA's conventions alone (the engine's family seam, on Dream's blocks), and the real model (its own blocks).
MODELS = {"no-shift": no_shift_model, "llada": tiny_llada}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def prompts(batch=2, length=5, seed=1):
    return torch.randint(1, MASK, (batch, length), generator=torch.Generator().manual_seed(seed))


def both(model, ids, mask=None, *, seed=0, soft_mask=None, gen_length, steps, block_length=None, **kw):
    ours = model.diffusion_generate(
        ids,
        mask,
        max_new_tokens=gen_length,
        steps=steps,
        block_length=block_length,
        soft_mask=soft_mask,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )
    theirs = llada_generate(
        model,
        ids,
        mask,
        steps=steps,
        gen_length=gen_length,
        block_length=block_length or gen_length,
        mask_id=model.config.mask_token_id,
        soft_mask=SoftMask.from_any(soft_mask),
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )
    return ours, theirs


def test_transfer_counts_follow_llada():
    assert num_transfer_tokens(torch.tensor([7, 8, 2]), 3).tolist() == [[3, 2, 2], [3, 3, 2], [1, 1, 0]]


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize(
    "blocks",
    [(12, 6), (4, 6), pytest.param((3, 4), marks=pytest.mark.slow)],
    ids=["one-block", "three-blocks", "four-blocks"],
)
def test_matches_llada_generate(model, remasking, temperature, blocks):
    block_length, steps = blocks
    ours, theirs = both(
        model,
        prompts(),
        gen_length=12,
        steps=steps,
        block_length=block_length,
        remasking=remasking,
        temperature=temperature,
        seed=3,
    )
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("sm", [SOFT_MASKS[0], pytest.param(SOFT_MASKS[1], marks=pytest.mark.slow), SOFT_MASKS[2]])
def test_soft_masking_matches_dense_formulation(model, sm):
    ours, theirs = both(model, prompts(), gen_length=12, steps=6, block_length=4, temperature=0.5, soft_mask=sm)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("sm", [None, SOFT_MASKS[0]])
def test_cfg_matches_llada_generate(model, sm):
    ours, theirs = both(
        model, prompts(), gen_length=8, steps=4, block_length=4, cfg_scale=1.5, temperature=0.3, soft_mask=sm
    )
    assert torch.equal(ours, theirs)
    plain = diffusion_generate(
        model, prompts(), max_new_tokens=8, steps=4, block_length=4, temperature=0.3, soft_mask=sm, seed=0
    )
    assert not torch.equal(ours, plain)


@pytest.mark.parametrize("threshold", [0.05, pytest.param(0.3, marks=pytest.mark.slow), 1.0])
@pytest.mark.parametrize("sm", [None, SOFT_MASKS[1]])
def test_threshold_matches_fast_dllm_rule(model, threshold, sm):
    ours, theirs = both(
        model, prompts(), gen_length=12, steps=3, block_length=4, threshold=threshold, soft_mask=sm, temperature=0.4
    )
    assert torch.equal(ours, theirs)


def padded_batch():
    ids = prompts(3, 6, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("sm", [None, SOFT_MASKS[0]])
def test_left_padding_matches_llada_generate_and_single_prompts(model, sm):
    ids, mask = padded_batch()
    kw = dict(gen_length=8, steps=4, block_length=4, soft_mask=sm)
    ours, theirs = both(model, ids, mask, **kw)
    assert torch.equal(ours, theirs)
    for b in range(3):
        real = mask[b].bool()
        alone, _ = both(model, ids[b : b + 1, real], **kw)
        assert torch.equal(ours[b, 6:], alone[0, int(real.sum()) :])


def test_dream_keywords_are_errors(model):
    for kw in (dict(alg="entropy"), dict(top_p=0.9), dict(top_k=3), dict(alg_temp=0.1), dict(eps=0.01)):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=f"{name}.*Dream's decoding keywords"):
            diffusion_generate(model, prompts(), max_new_tokens=4, steps=2, **kw)
    with pytest.raises(ValueError, match="unknown remasking 'lowest'"):
        diffusion_generate(model, prompts(), max_new_tokens=4, steps=2, remasking="lowest")
