"""Decoding parity: the engine against the oracle (Dream's algorithm, the paper's dense soft-masking), token for
token."""

from __future__ import annotations

import pytest
import torch
from _decoding_oracle import oracle_generate
from hypothesis import given, settings
from hypothesis import strategies as st

from softmask_ext import DreamConfig, DreamModel, SoftMask
from softmask_ext.decoding import ALGS, diffusion_generate

MASK = 96


def tiny_model(vocab: int = 97, seed: int = 0) -> DreamModel:
    config = DreamConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        mask_token_id=vocab - 1,
        pad_token_id=0,
        eos_token_id=0,
        bos_token_id=0,
    )
    torch.manual_seed(seed)
    model = DreamModel(config).eval()
    # Larger weights than the pretraining init give distinct, non-uniform predictions (no near-ties).
    model.reset_parameters(std=0.3)
    return model


@pytest.fixture(scope="module")
def model() -> DreamModel:
    return tiny_model()


def prompts(batch: int = 2, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, MASK, (batch, length), generator=torch.Generator().manual_seed(seed))


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of lengths 6, 3 and 1, left-padded with the pad id 0."""
    ids = prompts(3, 6, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


def both(model, ids, mask=None, *, seed=None, soft_mask=None, **kw):
    """(engine, oracle) outputs of the same call, sharing the random stream when ``seed`` is given."""
    gen_a = torch.Generator().manual_seed(seed) if seed is not None else None
    gen_b = torch.Generator().manual_seed(seed) if seed is not None else None
    ours = diffusion_generate(model, ids, mask, generator=gen_a, soft_mask=soft_mask, **kw)
    theirs, _ = oracle_generate(
        model,
        ids,
        mask,
        mask_token_id=model.config.mask_token_id,
        generator=gen_b,
        soft_mask=SoftMask.from_any(soft_mask),
        **kw,
    )
    return ours, theirs


@pytest.mark.parametrize("alg", ALGS)
def test_binary_greedy_matches_reference(model, alg):
    ours, theirs = both(model, prompts(), max_new_tokens=12, steps=5, alg=alg, seed=3)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("alg", ALGS)
def test_binary_sampling_matches_reference_with_shared_noise(model, alg):
    ours, theirs = both(
        model, prompts(), max_new_tokens=10, steps=4, alg=alg, temperature=0.8, top_p=0.9, top_k=20, seed=11
    )
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("alg", ["maskgit_plus", "entropy"])
def test_alg_temp_matches_reference_with_shared_noise(model, alg):
    ours, theirs = both(model, prompts(), max_new_tokens=10, steps=4, alg=alg, alg_temp=0.5, seed=5)
    assert torch.equal(ours, theirs)


# Centres near the tiny model's typical negative entropy (about -3.5), so that lam spreads over (0, scale).
SOFT_MASKS = [
    {"transparency_scale": 0.9, "transparency_centre": -3.5, "transparency_steepness": 2.0},
    {"transparency_scale": 0.7, "transparency_centre": -3.0, "mixinputs_k": 3, "transparency_scheduling": "linear"},
    {"transparency_scale": 0.8, "transparency_centre": -4.0, "mixinputs_k": 2, "transparency_scheduling": "stepwise"},
    {
        "transparency_alg": "mixinputs_with_temp",
        "transparency_scale": 0.6,
        "transparency_centre": -3.5,
        "mixture_temp": 0.7,
    },
]


@pytest.mark.parametrize("config", SOFT_MASKS)
@pytest.mark.parametrize("alg", ALGS)
def test_soft_masking_matches_dense_formulation(model, alg, config):
    ours, theirs = both(model, prompts(), max_new_tokens=10, steps=5, alg=alg, seed=2, soft_mask=config)
    assert torch.equal(ours, theirs)


def test_soft_masking_changes_the_decoding(model):
    """A strong soft mask must actually reach the model (guards against the blend being silently dropped)."""
    kw = dict(max_new_tokens=16, steps=4, alg="entropy")
    binary = diffusion_generate(model, prompts(4), **kw)
    soft = diffusion_generate(model, prompts(4), soft_mask=SOFT_MASKS[0], **kw)
    assert not torch.equal(binary, soft)


def test_soft_masking_with_sampling_matches_reference(model):
    ours, theirs = both(
        model,
        prompts(),
        max_new_tokens=10,
        steps=5,
        alg="entropy",
        temperature=0.5,
        top_p=0.95,
        seed=4,
        soft_mask=SOFT_MASKS[1],
    )
    assert torch.equal(ours, theirs)


@settings(max_examples=25)
@given(
    alg=st.sampled_from(ALGS),
    batch=st.integers(1, 3),
    prompt_len=st.integers(1, 6),
    length=st.integers(1, 12),
    steps_frac=st.floats(0.05, 1.0),
    temperature=st.sampled_from([0.0, 0.3, 1.0]),
    top_p=st.sampled_from([None, 0.8, 1.0]),
    top_k=st.sampled_from([None, 5]),
    sm=st.sampled_from([None, *SOFT_MASKS]),
    prompt_masks=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5)), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_property(
    model, alg, batch, prompt_len, length, steps_frac, temperature, top_p, top_k, sm, prompt_masks, seed
):
    ids = prompts(batch, prompt_len, seed=seed)
    # Mask tokens inside the prompts are decoded too (position 0 included). The last prompt token stays real: a
    # canvas of masks only makes near-equal predictions at every position, whose order fp rounding decides.
    for row, column in prompt_masks if prompt_len > 1 else ():
        ids[row % batch, column % (prompt_len - 1)] = MASK
    fewest = int((ids == MASK).sum(-1).min()) + length
    if fewest == 0:
        length = fewest = 1
    steps = max(1, round(steps_frac * fewest))
    ours, theirs = both(
        model,
        ids,
        max_new_tokens=length,
        steps=steps,
        alg=alg,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        soft_mask=sm,
    )
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("sm", [None, SOFT_MASKS[1]])
def test_left_padding_matches_reference(model, sm):
    ids, mask = padded_batch()
    ours, theirs = both(model, ids, mask, max_new_tokens=8, steps=4, alg="maskgit_plus", soft_mask=sm)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("sm", [None, SOFT_MASKS[0]])
@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_batch_equals_each_prompt_alone(model, alg, sm):
    ids, mask = padded_batch()
    kw = dict(max_new_tokens=8, steps=4, alg=alg, soft_mask=sm)
    batched = diffusion_generate(model, ids, mask, **kw)
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        alone = diffusion_generate(model, ids[b : b + 1, real], **kw)
        assert torch.equal(batched[b, ids.shape[1] :], alone[0, int(real.sum()) :])


def infill_prompts() -> torch.Tensor:
    """Left-padded prompts with a span of 4 masks between a prefix and a suffix of 3 tokens, and a lone mask at the
    start of the unpadded row (its prediction comes from row 0, as in Dream's shift)."""
    ids, mask = padded_batch()
    ids = torch.cat([ids, torch.full((3, 4), MASK), prompts(3, 3, seed=8)], dim=1)
    ids[0, 0] = MASK
    return ids, torch.cat([mask, torch.ones(3, 7, dtype=mask.dtype)], dim=1)


@pytest.mark.parametrize("new_tokens", [0, 3])
@pytest.mark.parametrize("sm", [None, SOFT_MASKS[1], SOFT_MASKS[2]])
@pytest.mark.parametrize("alg", ALGS)
def test_prompt_masks_match_reference(model, alg, sm, new_tokens):
    ids, mask = infill_prompts()
    ours, theirs = both(
        model, ids, mask, max_new_tokens=new_tokens, steps=2, alg=alg, seed=6, soft_mask=sm, temperature=0.5
    )
    assert torch.equal(ours, theirs)
    known = ids != MASK
    assert torch.equal(ours[:, : ids.shape[1]][known], ids[known])


@pytest.mark.parametrize("new_tokens", [0, 2])
def test_rows_with_fewer_masks_than_steps_match_reference(model, new_tokens):
    """Rows may hold fewer masks than there are steps (some of their steps unmask nothing), or none at all."""
    ids = prompts(3, 6, seed=9)
    ids[0, 1:5] = MASK
    ids[1, 2] = MASK
    ours, theirs = both(
        model, ids, max_new_tokens=new_tokens, steps=4 + new_tokens, alg="entropy", seed=1, soft_mask=SOFT_MASKS[1]
    )
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[2, :6], ids[2])


@pytest.mark.parametrize("sm", [None, SOFT_MASKS[0]])
def test_prompt_masks_decode_as_a_suffix_placed_by_a_tokens_hook(model, sm):
    """Infilling two ways: masks in the prompt, or masks generated after the prefix with a hook writing the suffix
    behind them before the first step (Dream's mechanism for fixed tokens). Same noise columns, same result."""
    ids, mask = infill_prompts()
    ids[0, 0] = 1
    prefix, suffix = ids[:, :-7], ids[:, -3:]

    def place_suffix(step, x, logits):
        if step is None:
            x[:, -3:] = suffix
        return x

    kw = dict(steps=4, alg="entropy", temperature=0.7, seed=3, soft_mask=sm)
    native = diffusion_generate(model, ids, mask, max_new_tokens=0, **kw)
    hooked = diffusion_generate(
        model, prefix, mask[:, :-7], max_new_tokens=7, generation_tokens_hook_func=place_suffix, **kw
    )
    assert torch.equal(native, hooked)


def test_output_keeps_prompt_and_padding(model):
    ids, mask = padded_batch()
    out = diffusion_generate(model, ids, mask, max_new_tokens=6, steps=3, alg="entropy")
    assert out.shape == (3, 12) and out.dtype == torch.int64
    assert torch.equal(out[:, :6], ids)


@pytest.mark.parametrize("alg", ALGS)
def test_sampling_is_reproducible_and_seed_dependent(model, alg):
    kw = dict(max_new_tokens=12, steps=6, alg=alg, temperature=1.0)
    a = diffusion_generate(model, prompts(), seed=123, **kw)
    b = diffusion_generate(model, prompts(), seed=123, **kw)
    c = diffusion_generate(model, prompts(), seed=124, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_generator_is_used_without_seed(model):
    kw = dict(max_new_tokens=12, steps=6, alg="entropy", temperature=1.0)
    torch.manual_seed(9)
    a = diffusion_generate(model, prompts(), **kw)
    torch.manual_seed(9)
    b = diffusion_generate(model, prompts(), **kw)
    assert torch.equal(a, b)


def test_history(model):
    ids = prompts()
    out = diffusion_generate(
        model, ids, max_new_tokens=12, steps=4, alg="maskgit_plus", output_history=True, return_dict_in_generate=True
    )
    _, reference_history = oracle_generate(
        model, ids, max_new_tokens=12, steps=4, alg="maskgit_plus", mask_token_id=MASK
    )
    assert len(out.history) == 4
    assert torch.equal(out.history[-1], out.sequences)
    for ours, theirs in zip(out.history, reference_history):
        assert torch.equal(ours, theirs)
    masks_left = [int((h == MASK).sum()) for h in out.history]
    assert masks_left == sorted(masks_left, reverse=True) and masks_left[-1] == 0


def test_history_needs_return_dict(model):
    out = diffusion_generate(model, prompts(), max_new_tokens=4, steps=2, output_history=True)
    assert isinstance(out, torch.Tensor)
    out = diffusion_generate(model, prompts(), max_new_tokens=4, steps=2, return_dict_in_generate=True)
    assert out.history is None


@pytest.mark.parametrize("sm", [None, SOFT_MASKS[0]])
def test_identity_hooks_match_reference(model, sm):
    calls = []

    def tokens_hook(step, x, logits):
        calls.append((step, None if logits is None else tuple(logits.shape)))
        return x

    ids = prompts()
    ours = diffusion_generate(
        model,
        ids,
        max_new_tokens=8,
        steps=4,
        alg="entropy",
        soft_mask=sm,
        generation_tokens_hook_func=tokens_hook,
        generation_logits_hook_func=lambda step, x, logits: logits,
    )
    theirs, _ = oracle_generate(
        model, ids, max_new_tokens=8, steps=4, alg="entropy", mask_token_id=MASK, soft_mask=SoftMask.from_any(sm)
    )
    assert torch.equal(ours, theirs)
    assert calls == [(None, None)] + [(i, (2, 13, 97)) for i in range(4)]


def test_logits_hook_can_forbid_tokens(model):
    def ban_low_ids(step, x, logits):
        logits = logits.clone()
        logits[..., :50] = float("-inf")
        return logits

    out = diffusion_generate(
        model, prompts(), max_new_tokens=10, steps=5, alg="maskgit_plus", generation_logits_hook_func=ban_low_ids
    )
    assert (out[:, 5:] >= 50).all()


def test_tokens_hook_edits_are_kept_and_recounted(model):
    """A hook that fills positions itself: Dream recounts the masks, and so must the engine."""

    def fill_last_four(step, x, logits):
        x = x.clone()
        x[:, -4:] = 7
        return x

    ids = prompts()
    kw = dict(max_new_tokens=12, steps=5, alg="topk_margin")
    ours = diffusion_generate(model, ids, generation_tokens_hook_func=fill_last_four, **kw)
    theirs, _ = oracle_generate(model, ids, mask_token_id=MASK, tokens_hook=fill_last_four, **kw)
    assert torch.equal(ours, theirs)
    assert (ours[:, -4:] == 7).all()


def test_soft_mask_module_on_its_own(model):
    sm = SoftMask(k=2, scale=0.8, centre=-3.5, steepness=2.0)
    ours, theirs = both(model, prompts(), max_new_tokens=8, steps=4, alg="maskgit_plus", soft_mask=sm)
    assert torch.equal(ours, theirs)


def test_transparency_config_file(model, tmp_path):
    sm = SoftMask(k=1, scale=0.75, centre=-3.5, steepness=2.0)
    path = sm.save_transparency_config(tmp_path)
    kw = dict(max_new_tokens=8, steps=4, alg="entropy")
    assert torch.equal(
        diffusion_generate(model, prompts(), soft_mask=path, **kw),
        diffusion_generate(model, prompts(), soft_mask=sm, **kw),
    )


def test_model_method_delegates(model):
    kw = dict(max_new_tokens=8, steps=4, alg="entropy", transparency_scale=0.5, transparency_centre=-3.5)
    assert torch.equal(model.diffusion_generate(prompts(), **kw), diffusion_generate(model, prompts(), **kw))
