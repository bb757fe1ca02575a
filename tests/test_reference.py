"""The pure-PyTorch reference against independent float64 formulas and the authors' dense path."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from softmask_ext import reference


def _neg_entropy_f64(row: torch.Tensor) -> float:
    p = torch.softmax(row.double(), -1)
    return float(sum(pi * math.log(pi) for pi in p.tolist() if pi > 0))


@given(
    vocab=st.integers(1, 300), k=st.integers(1, 8), scale=st.sampled_from([0.1, 1.0, 30.0]), seed=st.integers(0, 2**16)
)
def test_topk_entropy_matches_float64_formulas(vocab, k, scale, seed):
    k = min(k, vocab)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, vocab, generator=g) * scale
    ids, probs, negh = reference.topk_entropy(logits, k)
    assert ids.shape == (3, k) and probs.shape == (3, k) and negh.shape == (3,)
    for r in range(3):
        chosen = logits[r, ids[r]]
        assert torch.all(chosen[:-1] >= chosen[1:]), "ids must be in descending logit order"
        assert torch.all(chosen.min() >= logits[r].sort(descending=True).values[k - 1])
        torch.testing.assert_close(probs[r].double(), torch.softmax(chosen.double(), -1), atol=1e-6, rtol=1e-5)
        assert negh[r].item() == pytest.approx(_neg_entropy_f64(logits[r]), abs=1e-4 * max(1.0, math.log(vocab)))


def test_neg_entropy_handles_neg_inf_and_nan():
    logits = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")], [1.0, float("nan"), 0.0, 0.0]])
    negh = reference.neg_entropy(logits)
    assert negh[0].item() == pytest.approx(-math.log(2.0))
    assert math.isnan(negh[1].item())
    assert math.isnan(reference.neg_entropy(torch.full((1, 4), float("-inf"))).item())
    assert math.isnan(reference.neg_entropy(torch.tensor([[0.0, float("inf")]])).item())


def test_temperature_scales_the_full_softmax():
    logits = torch.randn(4, 50)
    torch.testing.assert_close(reference.neg_entropy(logits, temperature=2.0), reference.neg_entropy(logits / 2.0))


def test_rows_select_flattened_rows():
    logits = torch.randn(2, 5, 40)
    rows = torch.tensor([[9, 0], [3, 3]])
    ids, probs, negh = reference.topk_entropy(logits, 2, rows=rows)
    full = reference.topk_entropy(logits.reshape(10, 40), 2)
    assert ids.shape == (2, 2, 2)
    torch.testing.assert_close(negh, full[2][rows])
    torch.testing.assert_close(probs, full[1][rows])


def test_blend_matches_dense_path():
    vocab, dim, k, mask = 30, 6, 3, 29
    weight = torch.randn(vocab, dim, dtype=torch.float64)
    logits = torch.randn(5, vocab, dtype=torch.float64)
    lam = torch.rand(5, dtype=torch.float64)
    ids, probs, _ = reference.topk_entropy(logits, k)
    blend_ids = torch.cat([torch.full((5, 1), mask), ids], 1)
    coeffs = torch.cat([(1 - lam)[:, None], lam[:, None] * probs.double()], 1)
    ours = reference.blend_embeddings(weight, blend_ids, coeffs)
    torch.testing.assert_close(ours, reference.dense_soft_embeddings(logits, weight, mask, lam, k))


def test_blend_gradcheck():
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    coeffs = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (4, 2))
    assert torch.autograd.gradcheck(lambda w, c: reference.blend_embeddings(w, ids, c), (weight, coeffs))
