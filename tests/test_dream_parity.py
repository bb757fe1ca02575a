"""Parity with Dream's ``diffusion_generate`` keywords and with the authors' binary setting (transparency_alg
"none")."""

from __future__ import annotations

import itertools
import json
import types
import warnings

import pytest
import torch
from _decoding_oracle import oracle_generate
from _training_helpers import make_model_dir
from test_decoding import padded_batch, prompts, tiny_model
from transformers import GenerationConfig

from softmask_ext import SoftMask, generate
from softmask_ext.decoding import diffusion_generate
from softmask_ext.evaluate import resolve_soft_mask

BINARY = {"transparency_alg": "none"}
SM = {
    "transparency_alg": "mixinputs_with_topk",
    "transparency_scale": 0.9,
    "transparency_centre": -3.5,
    "transparency_steepness": 2.0,
    "mixinputs_k": 2,
}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def run(model, ids, mask=None, seed=0, **kw):
    return diffusion_generate(model, ids, mask, generator=torch.Generator().manual_seed(seed), **kw)


def oracle(model, ids, mask=None, seed=0, **kw):
    return oracle_generate(
        model, ids, mask, mask_token_id=model.config.mask_token_id, generator=torch.Generator().manual_seed(seed), **kw
    )


# ------------------------------------------------------------------------------------------ transparency_alg "none"


def test_none_config_is_binary_everywhere_it_is_read(model, tmp_path):
    assert SoftMask.from_transparency_config(BINARY) is None
    assert SoftMask.from_any(BINARY) is None and SoftMask.from_any(transparency_alg="none") is None
    (tmp_path / "transparency_config.json").write_text(json.dumps(BINARY))
    assert SoftMask.from_any(tmp_path) is None and SoftMask.from_transparency_config(tmp_path) is None
    # The authors pass their whole config as keywords; with "none" the other values mean nothing.
    assert SoftMask.from_any(**{**SM, "transparency_alg": "none"}) is None
    assert resolve_soft_mask(tmp_path, None) is None  # evaluate: the config beside the model
    assert resolve_soft_mask(tmp_path, str(tmp_path / "transparency_config.json")) is None  # evaluate --soft-mask
    kw = dict(max_new_tokens=8, steps=4, alg="entropy")
    binary = run(model, prompts(), **kw)
    assert not torch.equal(run(model, prompts(), soft_mask=SM, **kw), binary)  # SM does change this decoding
    assert torch.equal(run(model, prompts(), soft_mask=BINARY, **kw), binary)
    assert torch.equal(run(model, prompts(), soft_mask=tmp_path, **kw), binary)
    assert torch.equal(run(model, prompts(), **{**SM, "transparency_alg": "none"}, **kw), binary)
    with pytest.raises(ValueError, match="unknown transparency config keys"):
        SoftMask.from_any({"transparency_alg": "none", "transparency_scael": 0.1})


def test_generate_cli_decodes_a_none_config_as_binary(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "ckpt")
    argv = [
        "--model",
        str(model_dir),
        "--prompt",
        "def f(x):",
        "--max-new-tokens",
        "8",
        "--steps",
        "4",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ]
    generate.main([*argv, "--binary"])
    binary = capsys.readouterr().out
    config = tmp_path / "none.json"
    config.write_text(json.dumps(BINARY))
    generate.main([*argv, "--soft-mask", str(config)])
    assert capsys.readouterr().out == binary
    (model_dir / "transparency_config.json").write_text(json.dumps(BINARY))
    generate.main(argv)
    captured = capsys.readouterr()
    assert captured.out == binary and "using the soft-mask config" not in captured.err


# ------------------------------------------------------------------------------------------ Dream's keywords


def test_max_length_is_the_total_length(model):
    ids = prompts()
    by_new = run(model, ids, max_new_tokens=7, steps=7, alg="entropy")
    assert torch.equal(run(model, ids, max_length=ids.shape[1] + 7, steps=7, alg="entropy"), by_new)
    theirs, _ = oracle(model, ids, max_length=ids.shape[1] + 7, steps=7, alg="entropy")
    assert torch.equal(by_new, theirs)
    with pytest.warns(UserWarning, match="max_new_tokens takes precedence"):
        both = run(model, ids, max_new_tokens=7, max_length=30, steps=7, alg="entropy")
    assert torch.equal(both, by_new)


def test_without_a_length_dream_generates_20_new_tokens(model):
    ids = prompts()
    with pytest.warns(UserWarning, match="default of 20 new tokens"):
        out = run(model, ids, steps=4)
    assert out.shape == (2, ids.shape[1] + 20)
    # Dream's default max_length (20) in a config is read the same way, without the warning; capped at the positions.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(model, ids, generation_config={"max_length": 20}, steps=4).shape == out.shape
    long = torch.randint(1, 96, (1, 50))
    assert run(model, long, generation_config={"max_length": 20}, steps=4).shape == (1, 64)  # 64 positions


@pytest.mark.parametrize("alg,temperature", [("maskgit_plus", 0.8), ("entropy", 0.0)])
def test_num_return_sequences_repeats_each_row(model, alg, temperature):
    ids, mask = padded_batch()
    kw = dict(max_new_tokens=6, steps=3, alg=alg, temperature=temperature, num_return_sequences=3)
    ours = run(model, ids, mask, seed=4, **kw)
    theirs, _ = oracle(model, ids, mask, seed=4, **kw)
    assert ours.shape == (9, ids.shape[1] + 6) and torch.equal(ours, theirs)
    assert torch.equal(ours[:, : ids.shape[1]], ids.repeat_interleave(3, 0))
    if temperature == 0.0:  # greedy: the copies agree
        assert torch.equal(ours[0::3], ours[1::3]) and torch.equal(ours[0::3], ours[2::3])


@pytest.mark.parametrize("alg,soft_mask,eps", [("origin", None, 1e-3), ("topk_margin", SM, 0.0)])
def test_more_steps_than_masks_matches_dream(model, alg, soft_mask, eps):
    """5 masks over 12 steps: int(5 * (1 - s/t)) is 0 on most steps, which then unmask nothing; the last takes the rest.
    Dream's eps may be 0 (the last step then ends at s = 0)."""
    ids = prompts()
    kw = dict(max_new_tokens=5, steps=12, alg=alg, temperature=0.5, eps=eps)
    result = diffusion_generate(
        model,
        ids,
        generator=torch.Generator().manual_seed(2),
        soft_mask=soft_mask,
        output_history=True,
        return_dict_in_generate=True,
        **kw,
    )
    theirs, history = oracle(model, ids, seed=2, soft_mask=SoftMask.from_any(soft_mask), **kw)
    assert torch.equal(result.sequences, theirs)
    assert all(torch.equal(a, b) for a, b in zip(result.history, history)) and len(result.history) == 12
    left = [int((h == 96).sum()) for h in result.history]
    assert any(a == b for a, b in itertools.pairwise(left))  # some steps unmask nothing


def test_generation_config_object_or_dict_and_keywords_override_it(model):
    ids = prompts()
    fields = dict(max_new_tokens=6, steps=3, alg="maskgit_plus", temperature=0.7, top_p=0.9, top_k=20)
    expected = run(model, ids, **fields)
    assert torch.equal(run(model, ids, generation_config=fields), expected)
    assert torch.equal(run(model, ids, generation_config=types.SimpleNamespace(**fields)), expected)
    assert torch.equal(run(model, ids, generation_config=GenerationConfig(**fields)), expected)
    # A keyword wins over the config, as Dream's generation_config.update(**kwargs).
    assert torch.equal(run(model, ids, generation_config={**fields, "alg": "entropy"}, alg="maskgit_plus"), expected)
    result = run(
        model,
        ids,
        generation_config={
            **fields,
            "return_dict_in_generate": True,
            "output_history": True,
            "num_return_sequences": 2,
        },
    )
    assert result.sequences.shape[0] == 4 and len(result.history) == 3


def test_special_token_ids_are_read_where_dream_reads_them(model):
    ids = prompts()
    ids[0, 0] = 0  # the tiny model's pad id, without an attention mask
    with pytest.warns(UserWarning, match="Padding was detected but no attention mask"):
        run(model, ids, max_new_tokens=4, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model, ids, max_new_tokens=4, steps=2, pad_token_id=95)  # another pad id: no padding detected
        out = run(model, prompts(), max_new_tokens=4, steps=2, bos_token_id=3, eos_token_id=[4, 5])
    assert torch.equal(out, run(model, prompts(), max_new_tokens=4, steps=2))  # bos/eos do not change decoding
