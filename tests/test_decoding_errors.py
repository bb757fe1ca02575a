"""Bad input to diffusion_generate: each a clear ValueError/TypeError before any decoding work, never a crash."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_decoding import prompts, tiny_model

from softmask_ext.decoding import diffusion_generate


@pytest.fixture(scope="module")
def model():
    return tiny_model()


OK = dict(max_new_tokens=6, steps=3, alg="entropy")


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(steps=0), ValueError, "steps must be an int >= 1"),
        (dict(steps=-2), ValueError, "steps must be an int >= 1"),
        (dict(steps=2.5), ValueError, "steps must be an int"),
        (dict(max_new_tokens=None, max_length=4), ValueError, r"max_length \(4\) is the total length"),
        (dict(max_new_tokens=None, max_length=-1), ValueError, "max_length must be an int >= 0"),
        (dict(num_return_sequences=0), ValueError, "num_return_sequences must be an int >= 1"),
        (dict(generation_config={"stepz": 3}), ValueError, r"generation_config has unknown keys \['stepz'\]"),
        (dict(eos_token_id=[0, 97]), ValueError, r"eos_token_id must be a token id in \[0, 97\) or a list"),
        (dict(pad_token_id="0"), ValueError, r"pad_token_id must be a token id"),
        (dict(max_new_tokens=0, steps=1), ValueError, "nothing to decode: max_new_tokens is 0"),
        (dict(max_new_tokens=-1, steps=1), ValueError, "max_new_tokens must be an int >= 0"),
        (dict(alg="greedy"), ValueError, "unknown alg 'greedy'"),
        (dict(temperature=-0.1), ValueError, "temperature must be"),
        (dict(temperature=float("nan")), ValueError, "temperature must be"),
        (dict(top_p=0.0), ValueError, "top_p must be in"),
        (dict(top_p=1.5), ValueError, "top_p must be in"),
        (dict(top_k=0), ValueError, "top_k must be an int >= 1"),
        (dict(alg_temp=-1.0), ValueError, "alg_temp must be"),
        (dict(eps=1.0), ValueError, r"eps must be in \[0, 1\)"),
        (dict(mask_token_id=97), ValueError, r"mask_token_id 97 is outside the vocabulary \[0, 97\)"),
        (dict(mask_token_id=-1), ValueError, "mask_token_id must be a non-negative int"),
        (dict(max_new_tokens=60, steps=3), ValueError, r"exceeds the model's maximum of 64 positions"),
        (dict(soft_mask={"transparency_scael": 0.5}), ValueError, "unknown transparency config keys"),
        (dict(soft_mask={"transparency_scale": 1.5}), ValueError, r"scale must lie in \[0, 1\]"),
        (dict(soft_mask={"transparency_centre": 0.5}), ValueError, "centre must be <"),
        (dict(soft_mask={"mixinputs_k": 0}), ValueError, "k must be an int"),
        (dict(soft_mask={"transparency_scheduling": "cosine"}), ValueError, "unknown schedule"),
        (dict(transparency_alg="mixinputs_with_dice"), ValueError, "unknown alg"),
        (dict(soft_mask={"transparency_scale": 0.5}, transparency_scale=0.5), ValueError, "not both"),
        (dict(soft_mask="/no/such/transparency_config.json"), FileNotFoundError, "no transparency config"),
        (dict(tempreature=0.5), TypeError, r"unexpected keyword arguments \['tempreature'\]"),
        (dict(seed=1, generator=torch.Generator()), ValueError, "either generator or seed"),
        (dict(seed="1"), TypeError, "seed must be an int"),
        (dict(generation_tokens_hook_func=lambda i, x, l: None), TypeError, "must return a canvas"),
        (dict(generation_logits_hook_func=lambda i, x, l: l[:, :1]), TypeError, "must return logits"),
        (dict(block_length=4), ValueError, r"block_length \(4\) must divide the decoded length \(6"),
        (dict(block_length=0), ValueError, "block_length must be an int >= 1"),
        (dict(block_length=2, steps=4), ValueError, r"steps \(4\) must be a multiple of the number of blocks \(3"),
        (dict(threshold=0.0), ValueError, r"threshold must be in \(0, 1\]"),
        (dict(threshold=1.5), ValueError, r"threshold must be in \(0, 1\]"),
        (dict(threshold=0.9, alg="origin"), ValueError, "threshold needs a confidence"),
        (dict(threshold=0.9, alg_temp=0.5), ValueError, "threshold and alg_temp cannot be combined"),
        (dict(cache="full"), ValueError, "unknown cache 'full'"),
        (dict(cache="prefix", dual_cache=True), ValueError, r"cache='prefix' conflicts with dual_cache=True"),
        (dict(cache="none", use_cache=True), ValueError, r"cache='none' conflicts with use_cache=True"),
        (dict(use_cache="yes"), TypeError, "use_cache must be a bool"),
        (
            dict(cache="dual", generation_tokens_hook_func=lambda i, x, l: x),
            ValueError,
            "generation_tokens_hook_func needs cache='none'",
        ),
        (
            dict(use_cache=True, generation_logits_hook_func=lambda i, x, l: l),
            ValueError,
            "generation_logits_hook_func needs cache='none'",
        ),
        (dict(fast_dllm_compat=True), ValueError, "fast_dllm_compat reproduces Fast-dLLM's cached Dream loop"),
        (
            dict(fast_dllm_compat=True, cache="dual", block_length=3, steps=2),
            ValueError,
            "fast_dllm_compat needs at least 2 steps per block",
        ),
        (dict(remasking="low_confidence"), ValueError, "remasking is a LLaDA decoding keyword"),
        (dict(cfg_scale=1.0), ValueError, "cfg_scale is a LLaDA decoding keyword"),
        (dict(alg="low_confidence"), ValueError, "alg 'low_confidence' is LLaDA's remasking rule"),
    ],
)
def test_bad_settings(model, change, error, match):
    ids = prompts()
    ids[0, 0] = 5  # a real token, unless the caller claims 5 is the mask token
    with pytest.raises(error, match=match):
        diffusion_generate(model, ids, **{**OK, **change})


@pytest.mark.parametrize(
    "ids,mask,error,match",
    [
        (torch.tensor([1, 2, 3]), None, ValueError, "2-D"),
        (torch.ones(2, 3), None, TypeError, "int64 or int32"),
        (torch.ones(0, 3, dtype=torch.int64), None, ValueError, "at least one prompt"),
        (torch.ones(2, 0, dtype=torch.int64), None, ValueError, "at least one prompt"),
        (torch.tensor([[1, 2, 300]]), None, ValueError, r"input_ids must lie in \[0, 97\)"),
        (torch.tensor([[1, 2, -1]]), None, ValueError, r"input_ids must lie in \[0, 97\)"),
        (torch.tensor([[1, 2, 3]]), torch.ones(1, 2), ValueError, "attention_mask must have the shape"),
        (torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 1]]), ValueError, "only 0/1"),
        (torch.tensor([[1, 2, 0]]), torch.tensor([[1, 1, 0]]), ValueError, "pad prompts on the left"),
        (torch.tensor([[1, 0, 3]]), torch.tensor([[1, 0, 1]]), ValueError, "padding after real tokens"),
    ],
)
def test_bad_prompts(model, ids, mask, error, match):
    with pytest.raises(error, match=match):
        diffusion_generate(model, ids, mask, **OK)


def test_missing_mask_token_id(model):
    class NoMaskConfig:
        vocab_size = 97
        mask_token_id = None

    class Wrapper(torch.nn.Module):
        config = NoMaskConfig()

        def __init__(self):
            super().__init__()
            self.inner = model

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

    with pytest.raises(ValueError, match="no mask_token_id"):
        diffusion_generate(Wrapper(), prompts(), **OK)


def test_bad_prompt_masks(model):
    ids = prompts()
    ids[0, 1] = ids[0, 2] = ids[1, 3] = 96  # 2 + 2 and 2 + 1 masks to decode
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="the left padding holds the mask token id 96"):
        diffusion_generate(model, ids, mask, max_new_tokens=2, steps=2)


def test_a_threshold_with_the_entropy_confidence_warns_that_it_decodes_one_token_per_step():
    model, ids = tiny_model(), prompts()
    kw = dict(max_new_tokens=8, steps=8, threshold=0.9)
    with pytest.warns(UserWarning, match="maskgit_plus"):
        out = diffusion_generate(model, ids, alg="entropy", output_history=True, return_dict_in_generate=True, **kw)
    assert len(out.history) == 8  # one token per step: no position but the forced one passes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diffusion_generate(model, ids, alg="maskgit_plus", **kw)
