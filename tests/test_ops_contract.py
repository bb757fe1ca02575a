"""One input contract for both paths of softmask_ext.ops: every bad input raises the same error type with the same
message whether the compiled kernels or the pure-PyTorch reference serve the call (the reference is forced in-process
through ops.FORCE_REFERENCE, which SOFTMASK_EXT_FORCE_REFERENCE=1 sets at import)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from softmask_ext import ops

PATHS = [
    pytest.param("kernels", marks=pytest.mark.skipif(not ops.EXTENSION_LOADED, reason="the extension is not built")),
    "reference",
]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch) -> str:
    monkeypatch.setattr(ops, "FORCE_REFERENCE", request.param == "reference")
    return request.param


def _ids(*rows):
    return torch.tensor(rows, dtype=torch.long)


BAD_TOPK = [
    (lambda: ops.topk_entropy(torch.randn(2, 10), 0), ValueError, "k must be between 1 and 32"),
    (lambda: ops.topk_entropy(torch.randn(2, 40), 33), ValueError, "k must be between 1 and 32"),
    (lambda: ops.topk_entropy(torch.randn(2, 4), 5), ValueError, "k=5 exceeds the vocabulary size V=4"),
    (lambda: ops.topk_entropy(torch.zeros(2, 0), 1), ValueError, "exceeds the vocabulary size"),
    (lambda: ops.topk_entropy(torch.randn(2, 10), 2.0), TypeError, "k must be an int"),
    (lambda: ops.topk_entropy(torch.randn(2, 10), True), TypeError, "k must be an int"),
    (lambda: ops.topk_entropy(torch.randint(0, 5, (2, 10)), 2), TypeError, "logits must be float32, bfloat16"),
    (lambda: ops.topk_entropy(torch.ones(2, 10, dtype=torch.bool), 2), TypeError, "logits must be float32"),
    (lambda: ops.topk_entropy(torch.tensor(1.0), 1), ValueError, "at least one dimension"),
    (
        lambda: ops.topk_entropy(torch.randn(10, 2).t(), 2),
        ValueError,
        "vocabulary\\) dimension of logits must be contig",
    ),
    (lambda: ops.topk_entropy(torch.randn(2, 10), 2, temperature=0.0), ValueError, "temperature must be a positive"),
    (lambda: ops.topk_entropy(torch.randn(2, 10), 2, temperature=float("inf")), ValueError, "positive finite"),
    (lambda: ops.topk_entropy(torch.randn(2, 10), 2, rows=torch.tensor([0.0])), TypeError, "rows must be int64"),
    (
        lambda: ops.topk_entropy(torch.randn(2, 10), 2, rows=torch.tensor([0], dtype=torch.int32)),
        TypeError,
        "rows must be int64",
    ),
    (
        lambda: ops.topk_entropy(torch.randn(2, 10), 2, rows=_ids(0).to("meta")),
        ValueError,
        "rows is on meta but the other inputs are on cpu",
    ),
    (lambda: ops.topk_entropy(torch.randn(2, 10), 2, rows=_ids(2)), IndexError, r"rows must lie in \[-1, 2\), got"),
    (
        lambda: ops.topk_entropy(torch.randn(2, 3, 10), 2, rows=_ids(-2, 5)),
        IndexError,
        r"rows must lie in \[-1, 6\), got values in \[-2, 5\]",
    ),
]

BAD_BLEND = [
    (
        lambda: ops.blend_embeddings(torch.randn(10), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)),
        ValueError,
        r"weight must be \[V, D\]",
    ),
    (
        lambda: ops.blend_embeddings(torch.randn(2, 10, 4), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)),
        ValueError,
        r"weight must be \[V, D\]",
    ),
    (
        lambda: ops.blend_embeddings(torch.randn(10, 4).long(), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)),
        TypeError,
        "weight must be float32",
    ),
    (
        lambda: ops.blend_embeddings(torch.randn(10, 4), torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1)),
        TypeError,
        "ids must be int64",
    ),
    (
        lambda: ops.blend_embeddings(torch.randn(10, 4), torch.zeros(2, dtype=torch.long), torch.ones(2)),
        ValueError,
        r"ids must be \[N, m\]",
    ),
    (
        lambda: ops.blend_embeddings(torch.randn(10, 4), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 2)),
        ValueError,
        "coeffs must have the shape of ids",
    ),
    (
        lambda: ops.blend_embeddings(torch.randn(10, 4), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1).long()),
        TypeError,
        "coeffs must be a floating tensor",
    ),
    (
        lambda: ops.blend_embeddings(torch.randn(10, 4), _ids([0]).to("meta"), torch.ones(1, 1)),
        ValueError,
        "ids is on meta but the other inputs are on cpu",
    ),
    (
        lambda: ops.blend_embeddings(torch.randn(10, 4), _ids([10]), torch.ones(1, 1)),
        IndexError,
        r"ids must lie in \[0, 10\), got values in \[10, 10\]",
    ),
    (lambda: ops.blend_embeddings(torch.randn(10, 4), _ids([-1]), torch.ones(1, 1)), IndexError, "ids must lie in"),
]


@pytest.mark.parametrize("call,error,message", BAD_TOPK + BAD_BLEND)
def test_bad_inputs_raise_the_same_clear_errors_on_both_paths(path, call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.skipif(not ops.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("call,error,message", BAD_TOPK + BAD_BLEND)
def test_both_paths_give_one_message(monkeypatch, call, error, message):
    raised = []
    for force in (False, True):
        monkeypatch.setattr(ops, "FORCE_REFERENCE", force)
        with pytest.raises(error) as info:
            call()
        raised.append((info.type, str(info.value)))
    assert raised[0] == raised[1]


def test_good_inputs_agree_on_both_paths(monkeypatch):
    logits, weight, rows = torch.randn(3, 4, 300), torch.randn(300, 8), _ids(0, 11, 5)
    results = []
    for force in (False, True) if ops.EXTENSION_LOADED else (True,):
        monkeypatch.setattr(ops, "FORCE_REFERENCE", force)
        ids, probs, negh = ops.topk_entropy(logits, 3, rows, 0.7)
        results.append((ids, probs, negh, ops.blend_embeddings(weight, ids, probs)))
    for got, expected in zip(results[0], results[-1]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_force_reference_variable_is_read_at_import():
    script = "from softmask_ext import ops; assert ops.FORCE_REFERENCE"
    env = dict(os.environ, SOFTMASK_EXT_FORCE_REFERENCE="1")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env=env)
