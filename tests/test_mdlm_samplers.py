"""MDLM's and ReMDM's samplers: token-for-token parity with a transcription of the published algorithms at fixed
noise (binary and soft-masked, the SM oracle being the authors' dense formulation), MDLM's cache, capturability,
the ``diffusion_generate`` route and clear errors."""

from __future__ import annotations

import _mdlm_oracle as oracle
import pytest
import torch
from tiny_mdlm import write_checkpoint

from softmask_ext.decoding import diffusion_generate
from softmask_ext.decoding.mdlm_samplers import (
    MDLMSampler,
    MDLMSamplerOptions,
    mdlm_generate,
)
from softmask_ext.model.family import load_model
from softmask_ext.soft_mask import SoftMask


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mdlm"))
    write_checkpoint(path, std=0.5, seed=3)
    return load_model(path)


def _oracle(model, batch, length, seed, **kwargs):
    def backbone(x=None, embeds=None):
        return model(input_ids=x, inputs_embeds=embeds).logits

    x = torch.full((batch, length), model.config.mask_token_id)
    with torch.no_grad():
        return oracle.sample(
            backbone,
            x,
            model.config.mask_token_id,
            table=model.get_input_embeddings().weight,
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        )


CASES = [
    dict(steps=8, sampler="mdlm"),
    dict(steps=24, sampler="mdlm", p_nucleus=0.9),  # more steps than tokens: the cache skips forward passes
    dict(steps=10, sampler="remdm-cap", eta=0.3),
    dict(steps=16, sampler="remdm-loop", eta=0.2, t_on=0.6, t_off=0.2, alpha_on=0.7, p_nucleus=0.9),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['sampler']}-{c['steps']}")
def test_binary_parity_with_published_algorithm(model, case):
    expected, expected_forwards = _oracle(model, 2, 12, seed=5, **case)
    kwargs = {k if k != "p_nucleus" else "nucleus_p": v for k, v in case.items()}
    got, forwards = mdlm_generate(model, batch_size=2, max_new_tokens=12, seed=5, return_forward_count=True, **kwargs)
    assert torch.equal(got, expected)
    assert forwards == expected_forwards


@pytest.mark.parametrize("case", CASES[::2] + CASES[3:], ids=lambda c: f"{c['sampler']}-{c['steps']}")
def test_soft_masked_parity_with_dense_formulation(model, case):
    soft_mask = SoftMask(k=3, scale=0.9, steepness=2.0, centre=-2.0)
    head = oracle.DenseTransparencyHead(soft_mask, model.config.mask_token_id)
    expected, _ = _oracle(model, 2, 12, seed=9, head=head, **case)
    binary, _ = _oracle(model, 2, 12, seed=9, **case)
    kwargs = {k if k != "p_nucleus" else "nucleus_p": v for k, v in case.items()}
    got = mdlm_generate(model, batch_size=2, max_new_tokens=12, seed=9, soft_mask=soft_mask, **kwargs)
    assert torch.equal(got, expected)
    assert not torch.equal(expected, binary)  # SM changed the samples, so the comparison says something


def test_cache_only_saves_forward_passes(model):
    cached, n_cached = mdlm_generate(model, batch_size=2, max_new_tokens=8, steps=32, seed=1, return_forward_count=True)
    plain, n_plain = mdlm_generate(
        model, batch_size=2, max_new_tokens=8, steps=32, seed=1, cache=False, return_forward_count=True
    )
    assert torch.equal(cached, plain) and n_plain == 33 and n_cached < n_plain


def test_prefix_is_kept_and_no_mask_is_left(model):
    prefix = torch.randint(0, 39, (2, 5))
    out = mdlm_generate(model, prefix, max_new_tokens=10, steps=10, sampler="remdm-cap", eta=0.5, seed=0)
    assert out.shape == (2, 15) and torch.equal(out[:, :5], prefix)
    assert not (out == model.config.mask_token_id).any()


def _runner(model):
    options = MDLMSamplerOptions(steps=4, sampler="remdm-loop", t_on=0.8, t_off=0.3, nucleus_p=0.9)
    runner = MDLMSampler(
        model,
        options,
        batch=2,
        prompt_len=0,
        new_tokens=6,
        soft_mask=SoftMask(k=3, scale=0.5),
        generator=torch.Generator().manual_seed(0),
    )
    runner.load(None)
    runner.forward_part(soft=False)
    runner.draw_noise()
    return runner


@torch.no_grad()
def test_update_part_compiles_without_graph_breaks(model):
    runner = _runner(model)
    torch.compile(runner.update_part, fullgraph=True, backend="eager")()
    assert int(runner.step_index) == 1


@pytest.mark.slow
@torch.no_grad()
def test_forward_part_compiles_without_graph_breaks(model):
    runner = _runner(model)
    torch.compile(runner.forward_part, fullgraph=True, backend="eager")()
    assert torch.isfinite(runner.p).all()


def test_diffusion_generate_reaches_the_samplers(model):
    prefix = torch.randint(0, 39, (1, 4))
    expected = mdlm_generate(
        model, prefix, max_new_tokens=6, steps=6, sampler="remdm-cap", seed=2, transparency_scale=0.5, mixinputs_k=3
    )
    got = diffusion_generate(
        model, prefix, max_new_tokens=6, steps=6, sampler="remdm-cap", seed=2, transparency_scale=0.5, mixinputs_k=3
    )
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="do not apply to MDLM"):
        diffusion_generate(model, prefix, max_new_tokens=6, alg="entropy", temperature=0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be an int >= 1"),
        (dict(sampler="remdm-rescale"), "ReMDM schedule 'rescale' does not exist"),
        (dict(sampler="ddpm"), "unknown sampler 'ddpm'"),
        (dict(max_new_tokens=25), "exceeds the model's length of 24"),
        (dict(sampler="remdm-loop", t_on=0.1, t_off=0.2), "remdm-loop needs"),
        (dict(nucleus_p=0.0), "nucleus_p"),
    ],
)
def test_settings_that_cannot_hold_are_clear_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mdlm_generate(model, batch_size=1, **{"max_new_tokens": 8, **kwargs})
