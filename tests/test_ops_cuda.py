"""The CUDA kernels against softmask_ext.reference (run on a GPU machine; skipped cleanly elsewhere): values in
fp32/bf16/fp16, odd and misaligned shapes, invalid rows, gradients, deterministic mode, opcheck, and CUDA-graph
capture of both ops. Every top-k/entropy test runs once per kernel variant (SOFTMASK_TOPK_VARIANT)."""

from __future__ import annotations

import contextlib
import functools
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softmask_ext import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not ops.CUDA_KERNELS, reason="the extension was built without CUDA kernels"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUDA = "cuda"
cuda_logits = functools.partial(make_logits, device=CUDA)


VARIANTS = ops.TOPK_VARIANTS


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch) -> str:
    """Runs the test with the top-k/entropy kernel variant of the parameter (the extension reads the variable at
    every call); the fixture value persists over a hypothesis test's examples."""
    monkeypatch.setenv("SOFTMASK_TOPK_VARIANT", request.param)
    return request.param


def cuda_generator(seed: int) -> torch.Generator:
    return torch.Generator(device=CUDA).manual_seed(seed)


@contextlib.contextmanager
def deterministic_algorithms():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 40),
    vocab=st.one_of(st.integers(1, 70), st.integers(1000, 70000)),
    k_seed=st.integers(1, 32),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([0.1, 3.0, 1e4]),
    neg_inf_fraction=st.sampled_from([0.0, 0.3, 0.999]),
    tie_levels=st.sampled_from([0, 3, 50]),
    temperature=st.sampled_from([1.0, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_entropy_matches_reference(
    variant, rows, vocab, k_seed, dtype, scale, neg_inf_fraction, tie_levels, temperature, seed
):
    logits = cuda_logits((rows, vocab), dtype, scale, neg_inf_fraction, tie_levels, cuda_generator(seed))
    assert_topk_entropy_matches(logits, min(k_seed, vocab), temperature=temperature)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 5, 17, 32])
def test_dream_vocabulary_with_rows(variant, dtype, k):
    logits = cuda_logits((4, 64, 152064), dtype, scale=4.0)
    rows = torch.randint(0, 256, (300,), device=CUDA)
    assert_topk_entropy_matches(logits, k, rows=rows)
    skip = torch.rand(300, device=CUDA) < 0.5
    assert_topk_entropy_matches(logits, k, rows=rows.masked_fill(skip, ops.SKIP_ROW))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 5, 32])
def test_many_rows_and_adversarial_orders(variant, dtype, k):
    """Enough rows for one block per row; rows whose values rise (every value a new maximum: the worst case for the
    running top-k and its shared threshold), fall, or are all equal (the lower index must win every tie)."""
    vocab = 20000
    logits = cuda_logits((2100, vocab), dtype, scale=4.0, tie_levels=50)
    ramp = torch.linspace(-8, 8, vocab, device=CUDA)
    logits[0], logits[1], logits[2] = ramp, ramp.flip(0), 1.5
    logits[3, ::7] = float("-inf")
    assert_topk_entropy_matches(logits, k)
    assert_lower_index_wins_ties(logits[2:3], k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [2, 3, 130])
@pytest.mark.parametrize("tie_levels", [0, 3])
def test_long_rows_split_over_blocks(variant, dtype, rows, tie_levels):
    """Few long rows: each row is split over several blocks and merged by a second kernel (a NaN row included)."""
    logits = cuda_logits((rows, 262144), dtype, scale=4.0, tie_levels=tie_levels)
    logits[-1, 100_000] = float("nan")
    skipped = torch.arange(rows, device=CUDA).masked_fill(torch.arange(rows, device=CUDA) % 2 == 0, ops.SKIP_ROW)
    for k in (1, 4, 32):
        assert_topk_entropy_matches(logits, k)
        assert_topk_entropy_matches(logits, k, rows=skipped)  # skipped rows in the split path and its merge


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_rows_and_ties(variant, dtype):
    logits = cuda_logits((9, 1001), dtype, tie_levels=4)  # odd row length: rows start off 16-byte boundaries
    assert_topk_entropy_matches(logits, 5)
    assert_topk_entropy_matches(logits[:, 3:], 5)
    for k in (1, 4, 32):
        assert_lower_index_wins_ties(logits, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_invalid_rows_give_nan(variant, dtype):
    logits = make_invalid_rows(5, dtype, device=CUDA)
    ids, probs, negh = ops.topk_entropy(logits, 3)
    assert torch.isnan(negh[:4]).all() and torch.isnan(probs[:4]).all() and not torch.isnan(negh[4])
    assert bool(((ids >= 0) & (ids < 3000)).all())
    assert_topk_entropy_matches(logits, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 5, 8, 32])
def test_variants_agree_with_the_default(monkeypatch, dtype, k):
    """Every variant selects the same ids as the default (one strict order) and the same probs and entropies up to
    rounding, on Dream-sized rows with many ties, in both grid layouts (one block per row; rows split over blocks)."""
    for rows in (2, 600):
        logits = cuda_logits((rows, 152064), dtype, scale=4.0, tie_levels=200)
        monkeypatch.setenv("SOFTMASK_TOPK_VARIANT", ops.DEFAULT_TOPK_VARIANT)
        expected = ops.topk_entropy(logits, k)
        for variant in VARIANTS:
            monkeypatch.setenv("SOFTMASK_TOPK_VARIANT", variant)
            ids, probs, negh = ops.topk_entropy(logits, k)
            assert torch.equal(ids, expected[0]), variant
            torch.testing.assert_close(probs, expected[1], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(negh, expected[2], rtol=1e-5, atol=1e-5)


def test_unknown_variant_is_a_value_error(monkeypatch):
    monkeypatch.setenv("SOFTMASK_TOPK_VARIANT", "fastest")
    with pytest.raises(ValueError, match="SOFTMASK_TOPK_VARIANT=fastest is not a kernel variant; expected one of"):
        ops.topk_entropy(cuda_logits((2, 100), torch.float32), 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [3584, 1001, 8])
def test_blend_matches_reference(dtype, dim):
    vocab = 1000
    weight = torch.randn(vocab, dim, device=CUDA).to(dtype)
    ids = torch.randint(0, vocab, (257, 4), device=CUDA)
    ids[:, -1] = 7  # the mask row, shared by every position
    coeffs = torch.rand(257, 4, device=CUDA)
    assert_blend_matches(weight, ids, coeffs)
    with deterministic_algorithms():
        assert_blend_matches(weight, ids, coeffs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_backward_is_bitwise_reproducible(dtype):
    weight = torch.randn(300, 520, device=CUDA).to(dtype)
    ids = torch.randint(0, 20, (2000, 4), device=CUDA)
    coeffs = torch.randn(2000, 4, device=CUDA)
    grad_out = torch.randn(2000, 520, device=CUDA).to(dtype)
    first = torch.ops.softmask_ext.blend_embeddings_backward(grad_out, weight, ids, coeffs, True)
    for _ in range(3):
        again = torch.ops.softmask_ext.blend_embeddings_backward(grad_out, weight, ids, coeffs, True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    cpu = torch.ops.softmask_ext.blend_embeddings_backward(grad_out.cpu(), weight.cpu(), ids.cpu(), coeffs.cpu(), True)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(first[0].cpu(), cpu[0], **tol)
    torch.testing.assert_close(first[1].cpu(), cpu[1], rtol=1e-4, atol=1e-3)


def test_cuda_matches_cpu_kernels_bitwise_on_ids(variant):
    logits = cuda_logits((64, 152064), torch.bfloat16, scale=4.0)
    cuda_out = ops.topk_entropy(logits, 3)
    cpu_out = ops.topk_entropy(logits.cpu(), 3)
    assert torch.equal(cuda_out[0].cpu(), cpu_out[0])  # same total order (value, then lower index)
    torch.testing.assert_close(cuda_out[1].cpu(), cpu_out[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cuda_out[2].cpu(), cpu_out[2], rtol=1e-4, atol=1e-4)


def test_opcheck(variant):
    logits = cuda_logits((3, 4, 1500), torch.float32)
    torch.library.opcheck(torch.ops.softmask_ext.topk_entropy, (logits, 3, None, 1.0))
    torch.library.opcheck(
        torch.ops.softmask_ext.topk_entropy, (logits.bfloat16(), 5, torch.tensor([0, 11, 4], device=CUDA), 0.7)
    )
    for dtype in DTYPES:
        weight = torch.randn(40, 24, device=CUDA, dtype=dtype, requires_grad=True)
        ids = torch.randint(0, 40, (6, 4), device=CUDA)
        coeffs = torch.rand(6, 4, device=CUDA, requires_grad=True)
        torch.library.opcheck(torch.ops.softmask_ext.blend_embeddings, (weight, ids, coeffs))


def test_cuda_graph_capture_of_both_ops(variant):
    vocab, dim, k = 32768, 256, 3
    logits = cuda_logits((2, 64, vocab), torch.bfloat16)
    weight = torch.randn(vocab, dim, device=CUDA, dtype=torch.bfloat16)
    rows = torch.arange(0, 128, 2, device=CUDA)

    def step():
        ids, probs, negh = ops.topk_entropy(logits, k, rows)
        lam = 0.5 * torch.sigmoid(negh)
        coeffs = torch.cat([lam[:, None] * probs, (1 - lam)[:, None]], dim=1)
        blend_ids = torch.cat([ids, torch.zeros_like(ids[:, :1])], dim=1)
        return ops.blend_embeddings(weight, blend_ids, coeffs)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    logits.copy_(cuda_logits((2, 64, vocab), torch.bfloat16, generator=cuda_generator(1)))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, step(), rtol=0, atol=0)


def test_cuda_graph_capture_of_backward():
    weight = torch.randn(500, 128, device=CUDA, requires_grad=True)
    ids = torch.randint(0, 500, (64, 4), device=CUDA)
    coeffs = torch.rand(64, 4, device=CUDA, requires_grad=True)
    grad_out = torch.randn(64, 128, device=CUDA)
    static = {}

    def train_step():
        weight.grad, coeffs.grad = None, None
        ops.blend_embeddings(weight, ids, coeffs).backward(grad_out)
        static["gw"], static["gc"] = weight.grad, coeffs.grad

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        train_step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with deterministic_algorithms(), torch.cuda.graph(graph):
        train_step()
    graph.replay()
    torch.cuda.synchronize()
    expected_gw = torch.zeros_like(weight).index_add_(
        0, ids.reshape(-1), (coeffs.detach()[..., None] * grad_out[:, None]).reshape(-1, 128)
    )
    torch.testing.assert_close(static["gw"], expected_gw, rtol=1e-4, atol=1e-4)


def test_torch_compile_fullgraph(variant):
    torch._dynamo.reset()
    logits = cuda_logits((2, 8, 3000), torch.bfloat16)
    weight = torch.randn(3000, 64, device=CUDA, requires_grad=True)

    def soft(logits, weight):
        ids, probs, negh = ops.topk_entropy(logits, 3)
        return ops.blend_embeddings(
            weight, ids.reshape(-1, 3), probs.reshape(-1, 3) * torch.sigmoid(negh).reshape(-1, 1)
        )

    compiled = torch.compile(soft, fullgraph=True)
    out = compiled(logits, weight)
    out.sum().backward()
    grad = weight.grad.clone()
    weight.grad = None
    expected = soft(logits, weight)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, weight.grad)


@pytest.mark.parametrize(
    "statement",
    [
        "ops.blend_embeddings(torch.randn(10, 8, device='cuda'), torch.tensor([[10]], device='cuda'), "
        "torch.ones(1, 1, device='cuda'))",
        "ops.topk_entropy(torch.randn(2, 10, device='cuda'), 2, rows=torch.tensor([5], device='cuda'))",
    ],
)
def test_out_of_range_indices_trigger_a_device_assert(statement):
    script = f"import torch\nfrom softmask_ext import ops\n{statement}\ntorch.cuda.synchronize()\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "must lie in" in result.stderr or "device-side assert" in result.stderr
