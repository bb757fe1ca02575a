"""The compiled CPU kernels against softmask_ext.reference: property tests, edge cases, autograd, torch.library
registration (opcheck, torch.compile), and the errors bad inputs give."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _ops_checks import (
    assert_blend_matches,
    assert_lower_index_wins_ties,
    assert_topk_entropy_matches,
    make_invalid_rows,
    make_logits,
)
from hypothesis import given
from hypothesis import strategies as st

from softmask_ext import ops, reference

pytestmark = pytest.mark.skipif(not ops.EXTENSION_LOADED, reason="the compiled extension is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    vocab=st.one_of(st.integers(1, 70), st.integers(900, 5000)),
    k_seed=st.integers(1, 32),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([0.1, 3.0, 1e4]),
    neg_inf_fraction=st.sampled_from([0.0, 0.3, 0.999]),
    tie_levels=st.sampled_from([0, 3, 50]),
    temperature=st.sampled_from([1.0, 0.5, 2.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_entropy_matches_reference(
    lead, vocab, k_seed, dtype, scale, neg_inf_fraction, tie_levels, temperature, seed
):
    g = torch.Generator().manual_seed(seed)
    k = min(k_seed, vocab)
    logits = make_logits((*lead, vocab), dtype, scale, neg_inf_fraction, tie_levels, g)
    assert_topk_entropy_matches(logits, k, temperature=temperature)


@given(
    rows_total=st.integers(1, 12),
    num_selected=st.integers(0, 20),
    vocab=st.integers(1, 3000),
    k_seed=st.integers(1, 32),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_rows_select_flattened_rows(rows_total, num_selected, vocab, k_seed, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = make_logits((rows_total, 1, vocab), dtype, generator=g)
    rows = torch.randint(0, rows_total, (num_selected,), generator=g)  # duplicates included
    assert_topk_entropy_matches(logits, min(k_seed, vocab), rows=rows)
    assert_topk_entropy_matches(logits, min(k_seed, vocab), rows=rows.reshape(1, -1))
    skip = torch.rand(num_selected, generator=g) < 0.4
    assert_topk_entropy_matches(logits, min(k_seed, vocab), rows=rows.masked_fill(skip, ops.SKIP_ROW))


@pytest.mark.parametrize("dtype", DTYPES)
def test_skipped_rows_are_zeros_and_leave_the_others_unchanged(dtype):
    logits = make_invalid_rows(6, dtype)  # rows 0-3 hold NaN, +inf or no finite value
    rows = torch.tensor([ops.SKIP_ROW, 4, ops.SKIP_ROW, 5, 0])
    ids, probs, negh = ops.topk_entropy(logits, 3, rows=rows)
    full = ops.topk_entropy(logits, 3)
    for out, whole in zip((ids, probs, negh), full):
        assert not out[[0, 2]].any()
        torch.testing.assert_close(out[[1, 3, 4]], whole[[4, 5, 0]], rtol=0, atol=0, equal_nan=True)
    assert_topk_entropy_matches(logits, 3, rows=rows)


def test_rows_follow_dream_shift_without_copy():
    logits = make_logits((2, 5, 300), torch.float32)
    shifted = torch.tensor([[0, 0, 1, 2, 3], [5, 5, 6, 7, 8]])  # position i reads row i - 1 (row 0 reads itself)
    ids, probs, negh = ops.topk_entropy(logits, 3, rows=shifted)
    dense = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    ref = ops.topk_entropy(dense, 3)
    assert torch.equal(ids, ref[0]) and torch.equal(probs, ref[1]) and torch.equal(negh, ref[2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_keep_the_lower_index(dtype):
    logits = make_logits((6, 2000), dtype, tie_levels=4)
    for k in (1, 3, 5, 32):
        assert_lower_index_wins_ties(logits, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dream_vocabulary(dtype):
    assert_topk_entropy_matches(make_logits((3, 152064), dtype, scale=4.0), 3)


def test_strided_rows_and_non_contiguous_leading_dims():
    base = make_logits((4, 6, 257), torch.float32)
    assert_topk_entropy_matches(base[:, ::2], 4)  # leading dims not flattenable as a view
    assert_topk_entropy_matches(base.transpose(0, 1), 4)


def test_k_equals_vocab_and_single_token_vocabulary():
    assert_topk_entropy_matches(make_logits((5, 7), torch.float32), 7)
    ids, probs, negh = ops.topk_entropy(torch.tensor([[2.5], [-1e4]]), 1)
    assert ids.tolist() == [[0], [0]] and probs.tolist() == [[1.0], [1.0]] and negh.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_invalid_rows_give_nan_without_crashing(dtype):
    logits = make_invalid_rows(6, dtype)
    logits[4, :] = float("-inf")
    logits[4, 123] = -5.0  # one finite logit: a valid, fully confident row
    ids, probs, negh = ops.topk_entropy(logits, 3)
    assert torch.isnan(negh[:4]).all() and torch.isnan(probs[:4]).all()
    assert negh[4] == 0.0 and probs[4].tolist() == [1.0, 0.0, 0.0] and ids[4, 0] == 123
    assert_topk_entropy_matches(logits, 3)


def test_float64_is_served_by_the_reference():
    logits = torch.randn(3, 40, dtype=torch.float64)
    weight = torch.randn(40, 5, dtype=torch.float64, requires_grad=True)
    ids, probs, negh = ops.topk_entropy(logits, 3)
    expected = reference.topk_entropy(logits, 3)
    assert torch.equal(ids, expected[0]) and torch.equal(negh, expected[2])
    coeffs = probs.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda w, c: ops.blend_embeddings(w, ids, c), (weight, coeffs))


def test_empty_inputs():
    ids, probs, negh = ops.topk_entropy(torch.zeros(0, 10), 2)
    assert ids.shape == (0, 2) and probs.shape == (0, 2) and negh.shape == (0,)
    ids, probs, negh = ops.topk_entropy(torch.zeros(3, 10), 2, rows=torch.zeros(0, dtype=torch.long))
    assert ids.shape == (0, 2) and negh.shape == (0,)
    out = ops.blend_embeddings(torch.randn(5, 4), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3))
    assert out.shape == (0, 4)
    out = ops.blend_embeddings(torch.randn(5, 4), torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0))
    assert torch.equal(out, torch.zeros(2, 4))


@given(
    vocab=st.integers(1, 300),
    dim=st.integers(1, 1100),
    n=st.integers(1, 9),
    m=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    coeff_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_blend_matches_reference(vocab, dim, n, m, dtype, coeff_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=g).to(dtype)
    ids = torch.randint(0, vocab, (n, m), generator=g)
    coeffs = torch.rand(n, m, generator=g).to(coeff_dtype)
    assert_blend_matches(weight, ids, coeffs)


def test_blend_non_contiguous_weight():
    weight = torch.randn(64, 40).t()  # [40, 64], column-major
    assert_blend_matches(weight, torch.randint(0, 40, (5, 3)), torch.rand(5, 3))


def test_blend_backward_is_deterministic_with_repeated_ids():
    weight = torch.randn(50, 333)
    ids = torch.randint(0, 5, (400, 4))  # every table row is hit by many positions
    coeffs = torch.randn(400, 4)
    grad_out = torch.randn(400, 333)
    results = [
        torch.ops.softmask_ext.blend_embeddings_backward(grad_out, weight, ids, coeffs, deterministic)
        for deterministic in (True, True, False)
    ]
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1])
    assert_blend_matches(weight, ids, coeffs)


def test_frozen_table_skips_its_gradient():
    weight = torch.randn(50, 33)  # frozen, as under LoRA/DoRA
    ids = torch.randint(0, 50, (7, 4))
    coeffs = torch.rand(7, 4, requires_grad=True)
    grad_out = torch.randn(7, 33)
    ops.blend_embeddings(weight, ids, coeffs).backward(grad_out)
    expected = torch.einsum("nd,nmd->nm", grad_out, weight[ids])
    torch.testing.assert_close(coeffs.grad, expected, rtol=1e-5, atol=1e-5)
    grad_weight, _ = torch.ops.softmask_ext.blend_embeddings_backward(grad_out, weight, ids, coeffs, False, False)
    assert grad_weight.shape == (0, 33)


def test_soft_embedding_matches_dense_path():
    """top-k + lam + blend reproduces the authors' dense mixture times the table."""
    vocab, dim, mask_id = 500, 48, 7
    logits, weight = torch.randn(6, vocab) * 2, torch.randn(vocab, dim)
    lam = torch.rand(6)
    ids, probs, _ = ops.topk_entropy(logits, 3)
    blend_ids = torch.cat([ids, torch.full((6, 1), mask_id)], dim=1)
    coeffs = torch.cat([lam[:, None] * probs, (1 - lam)[:, None]], dim=1)
    ours = ops.blend_embeddings(weight, blend_ids, coeffs)
    from softmask_ext.reference import dense_soft_embeddings

    torch.testing.assert_close(ours, dense_soft_embeddings(logits, weight, mask_id, lam, 3), rtol=1e-5, atol=1e-5)


def _opcheck_samples():
    logits = make_logits((3, 4, 1500), torch.float32)
    yield torch.ops.softmask_ext.topk_entropy, (logits, 3, None, 1.0)
    yield torch.ops.softmask_ext.topk_entropy, (logits.bfloat16(), 5, torch.tensor([0, 11, 4]), 0.7)
    weight = torch.randn(40, 24, requires_grad=True)
    ids = torch.randint(0, 40, (6, 4))
    coeffs = torch.rand(6, 4, requires_grad=True)
    yield torch.ops.softmask_ext.blend_embeddings, (weight, ids, coeffs)
    yield torch.ops.softmask_ext.blend_embeddings, (weight.detach().half().requires_grad_(), ids, coeffs)
    yield (
        torch.ops.softmask_ext.blend_embeddings_backward,
        (torch.randn(6, 24), weight.detach(), ids, coeffs.detach(), False),
    )
    yield (
        torch.ops.softmask_ext.blend_embeddings_backward,
        (torch.randn(6, 24), weight.detach(), ids, coeffs.detach(), True, False),
    )
    yield torch.ops.softmask_ext.blend_embeddings, (weight.detach(), ids, coeffs)  # frozen table


@pytest.mark.parametrize("sample", range(7))
def test_opcheck(sample):
    op, args = list(_opcheck_samples())[sample]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    def soft_embeddings(logits, weight, rows, lam_scale):
        ids, probs, negh = ops.topk_entropy(logits, 3, rows)
        lam = lam_scale * torch.sigmoid(negh)
        coeffs = torch.cat([lam[:, None] * probs, (1 - lam)[:, None]], dim=1)
        blend_ids = torch.cat([ids, torch.zeros_like(ids[:, :1])], dim=1)
        return ops.blend_embeddings(weight, blend_ids, coeffs)

    logits = torch.randn(2, 8, 300)
    weight = torch.randn(300, 16, requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    rows = torch.tensor([0, 3, 9, 15])
    compiled = torch.compile(soft_embeddings, fullgraph=True, backend="aot_eager")
    out = compiled(logits, weight, rows, scale)
    out.square().sum().backward()
    grads = weight.grad.clone(), scale.grad.clone()
    weight.grad, scale.grad = None, None
    expected = soft_embeddings(logits, weight, rows, scale)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads[0], weight.grad)
    torch.testing.assert_close(grads[1], scale.grad)


# Direct calls of the registered ops (bypassing softmask_ext.ops' own validation): the binding's checks.
BAD_DIRECT = [
    (lambda: torch.ops.softmask_ext.topk_entropy(torch.randn(2, 10), 0), ValueError, "k must be between"),
    (lambda: torch.ops.softmask_ext.topk_entropy(torch.randn(2, 4), 5), ValueError, "exceeds the vocabulary"),
    (lambda: torch.ops.softmask_ext.topk_entropy(torch.randn(2, 10).double(), 2), TypeError, "logits must be float32"),
    (lambda: torch.ops.softmask_ext.topk_entropy(torch.randn(10, 2).t(), 2), ValueError, "must be contiguous"),
    (
        lambda: torch.ops.softmask_ext.topk_entropy(torch.randn(2, 10), 2, torch.tensor([2])),
        IndexError,
        r"rows must lie in \[-1, 2\)",
    ),
    (
        lambda: torch.ops.softmask_ext.topk_entropy(torch.randn(2, 10), 2, torch.tensor([-2, 0])),
        IndexError,
        r"rows must lie in \[-1, 2\), got values in \[-2, 0\]",
    ),
    (
        lambda: torch.ops.softmask_ext.blend_embeddings(
            torch.randn(10), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
        ),
        ValueError,
        r"weight must be \[V, D\]",
    ),
    (
        lambda: torch.ops.softmask_ext.blend_embeddings_backward(
            torch.randn(1, 5), torch.randn(10, 4), torch.tensor([[1]]), torch.ones(1, 1), False
        ),
        ValueError,
        r"grad_out must be \[N, D\]",
    ),
    (
        lambda: torch.ops.softmask_ext.blend_embeddings_backward(
            torch.randn(1, 4).half(), torch.randn(10, 4), torch.tensor([[1]]), torch.ones(1, 1), False
        ),
        TypeError,
        "grad_out must have weight's dtype",
    ),
]


@pytest.mark.parametrize("call,error,message", BAD_DIRECT)
def test_bad_inputs_to_the_registered_ops_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_max_k_is_the_kernel_core_value():
    assert ops.MAX_K == ops._C.MAX_K == 32
    assert ops.SKIP_ROW == ops._C.SKIP_ROW == reference.SKIP_ROW == -1
    assert tuple(ops._C.TOPK_VARIANTS) == ops.TOPK_VARIANTS and ops.TOPK_VARIANTS[0] == "baseline"
    assert ops.DEFAULT_TOPK_VARIANT in ops.TOPK_VARIANTS


def test_missing_extension_falls_back_with_one_warning():
    script = """
import sys, warnings
sys.modules["softmask_ext._C"] = None  # makes `from . import _C` fail as a missing build would
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    from softmask_ext import ops, reference
    logits = torch.randn(3, 50)
    assert not ops.EXTENSION_LOADED
    for _ in range(3):
        got = ops.topk_entropy(logits, 2)
        out = ops.blend_embeddings(torch.randn(50, 4), got[0], got[1])
    assert torch.equal(got[2], reference.topk_entropy(logits, 2)[2])
mine = [w for w in caught if "softmask_ext" in str(w.message)]
assert len(mine) == 1, [str(w.message) for w in mine]
assert "falling back" in str(mine[0].message)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
