"""SoftMask: reparameterisation, lam, schedules, the embedding builder, and the transparency config format."""

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from softmask_ext import SoftMask, reference

MASK = 0


def test_initial_values_match_the_paper():
    sm = SoftMask()
    assert sm.scale.item() == pytest.approx(1e-6, rel=1e-3)
    assert sm.steepness.item() == pytest.approx(10 / 1.5, rel=1e-6)
    assert sm.centre.item() == pytest.approx(-0.75, rel=1e-6)
    assert sm.temperature.item() == pytest.approx(1.0, rel=1e-6)
    assert (sm.k, sm.alg, sm.schedule) == (1, "mixinputs_with_topk", "none")


@given(raw=st.lists(st.floats(-60, 60), min_size=4, max_size=4))
def test_constraints_hold_for_any_raw_value(raw):
    sm = SoftMask()
    with torch.no_grad():
        for p, v in zip((sm.raw_scale, sm.raw_steepness, sm.raw_centre, sm.raw_temperature), raw):
            p.fill_(v)
    assert 0 <= sm.scale.item() <= 1
    assert sm.steepness.item() > 0 and sm.temperature.item() > 0 and sm.centre.item() < 0


def test_lam_formula_and_schedules():
    sm = SoftMask(scale=0.5, steepness=4.0, centre=-1.0)
    negh = torch.tensor([-3.0, -1.0, 0.0])
    expected = 0.5 / (1 + torch.exp(-4.0 * (negh + 1.0)))
    torch.testing.assert_close(sm.lam(negh), expected)
    sm.schedule = "linear"
    torch.testing.assert_close(sm.lam(negh, progress=0.25), 0.25 * expected)
    torch.testing.assert_close(
        sm.lam(negh, progress=torch.tensor([1.0, 0.5, 0.0])), expected * torch.tensor([1.0, 0.5, 0.0])
    )
    sm.schedule = "stepwise"
    torch.testing.assert_close(sm.lam(negh, progress=0.75), expected)
    torch.testing.assert_close(sm.lam(negh, progress=0.5), torch.zeros(3))
    torch.testing.assert_close(sm.lam(negh, progress=None), expected)  # no progress: training, no schedule


def _dense_oracle(sm, input_ids, logits, weight, shift):
    """The paper's formulation, position by position, with the authors' dense mixture."""
    batch, length = input_ids.shape
    out = weight[input_ids].clone()
    for b in range(batch):
        for i in range(length):
            if input_ids[b, i] != MASK:
                continue
            row = logits[b, max(i - 1, 0) if shift else i][None]
            lam = sm.lam(reference.neg_entropy(row))
            out[b, i] = reference.dense_soft_embeddings(row, weight, MASK, lam, sm.k)[0]
    return out


@pytest.mark.parametrize("shift", [1, 0])
@pytest.mark.parametrize("k", [1, 3])
def test_build_embeddings_matches_the_papers_formulation(shift, k):
    sm = SoftMask(k=k, scale=0.7, steepness=3.0, centre=-2.0).double()
    vocab, dim = 40, 5
    weight = torch.randn(vocab, dim, dtype=torch.float64)
    input_ids = torch.randint(1, vocab, (2, 9))
    input_ids[0, 4:] = MASK
    input_ids[1, ::2] = MASK
    logits = torch.randn(2, 9, vocab, dtype=torch.float64) * 3
    got = sm.build_embeddings(input_ids, logits, weight, MASK, logit_shift=shift)
    torch.testing.assert_close(got, _dense_oracle(sm, input_ids, logits, weight, shift))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmasked_positions_read_no_logits(dtype):
    """A decoded position keeps its plain embedding without its prediction being read: a NaN logits row there (which
    the kernel skips) cannot reach the output, and the masked positions match the dense formulation."""
    sm = SoftMask(k=3, scale=0.7, steepness=3.0, centre=-2.0)
    weight = torch.randn(40, 6).to(dtype)
    input_ids = torch.tensor([[5, MASK, 9, MASK, MASK, 11]])
    logits = (torch.randn(1, 6, 40) * 3).to(dtype)
    logits[0, [0, 2, 5]] = float("nan")  # rows predicting (shift 0) the decoded positions
    got = sm.build_embeddings(input_ids, logits, weight, MASK, logit_shift=0)
    assert torch.equal(got[0, [0, 2, 5]], weight[[5, 9, 11]])
    with torch.no_grad():
        expected = _dense_oracle(sm.double(), input_ids, logits.double(), weight.double(), 0)  # fp64 oracle
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # the output is rounded to the table's dtype
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


def test_gradients_reach_parameters_and_table():
    sm = SoftMask(k=2, scale=0.3)
    weight = torch.randn(30, 4, requires_grad=True)
    input_ids = torch.tensor([[3, MASK, MASK, 7]])
    logits = torch.randn(1, 4, 30)
    sm.build_embeddings(input_ids, logits, weight, MASK, 1).pow(2).sum().backward()
    for p in (sm.raw_scale, sm.raw_steepness, sm.raw_centre):
        assert p.grad is not None and p.grad.abs().item() > 0
    assert weight.grad[MASK].abs().sum() > 0 and weight.grad[3].abs().sum() > 0


def test_full_vocabulary_variant():
    sm = SoftMask(alg="mixinputs_with_temp", scale=0.6, temperature=2.0).double()
    weight = torch.randn(20, 3, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(1, 3, 20, dtype=torch.float64)
    input_ids = torch.tensor([[5, MASK, MASK]])
    got = sm.build_embeddings(input_ids, logits, weight, MASK, 1)
    p = torch.softmax(logits[0, :2] / 2.0, -1)
    lam = sm.lam(reference.neg_entropy(logits[0, :2], temperature=2.0))[:, None]
    torch.testing.assert_close(got[0, 1:], (1 - lam) * weight[MASK] + lam * (p @ weight))
    got.sum().backward()
    assert sm.raw_temperature.grad.abs().item() > 0


def test_transparency_config_round_trip(tmp_path):
    config = {
        "transparency_alg": "mixinputs_with_topk",
        "transparency_scale": 0.25,
        "transparency_centre": -1,
        "transparency_steepness": 5,
        "mixinputs_k": 1,
        "mixture_temp": 1.0,
        "transparency_scheduling": "none",
    }
    sm = SoftMask.from_transparency_config(config)
    assert sm.to_transparency_config() == {**config, "transparency_centre": -1.0, "transparency_steepness": 5.0}
    path = sm.save_transparency_config(tmp_path)
    with open(path) as f:
        assert json.load(f) == sm.to_transparency_config()
    again = SoftMask.from_any(str(tmp_path))
    assert again.to_transparency_config() == sm.to_transparency_config()
    assert SoftMask.from_any(**config).to_transparency_config() == sm.to_transparency_config()
    assert SoftMask.from_any(sm) is sm and SoftMask.from_any(None) is None


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"transparency_scale": 1.5}, "scale must lie"),
        ({"transparency_centre": 0.5}, "centre must be"),
        ({"transparency_steepness": -1}, "steepness must be"),
        ({"mixture_temp": 0}, "temperature must be"),
        ({"mixinputs_k": 0}, "k must be"),
        ({"mixinputs_k": 33}, "k must be"),
        ({"transparency_alg": "mix"}, "unknown alg"),
        ({"transparency_scheduling": "cosine"}, "unknown schedule"),
        ({"transparency_scale": "0.2"}, "finite number"),
        ({"transparency_scale": math.nan}, "finite number"),
        ({"transparency_sclae": 0.2}, "unknown transparency config keys"),
    ],
)
def test_bad_configs_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        SoftMask.from_transparency_config(bad)


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        SoftMask.from_transparency_config(tmp_path / "nope.json")
    (tmp_path / "transparency_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SoftMask.from_transparency_config(tmp_path)
