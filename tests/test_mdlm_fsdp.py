"""MDLM training under FSDP: two gloo processes train like one process with twice the accumulation (SM at sm_prob
0.5, so the processes disagree on SM micro-batches and run the lockstep pass), write the same checkpoint files, save
the sharded EMA whole and resume exactly; fsdp in one process is a clear error. The FSDP runs all happen in one
torchrun launch (tests/_mdlm_worker.py)."""

from __future__ import annotations

import json
from pathlib import Path

import _mdlm_worker as worker
import pytest
import torch
from _training_helpers import TINY_MDLM
from safetensors.torch import load_file

from softmask_ext.conventions import EMA_WEIGHTS, MODEL_WEIGHTS, SOFT_MASK_WEIGHTS
from softmask_ext.training import latest_checkpoint

WEIGHT_FILES = (MODEL_WEIGHTS, EMA_WEIGHTS, SOFT_MASK_WEIGHTS)
FINAL = Path("final") / MODEL_WEIGHTS  # the EMA weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mdlm-fsdp")
    worker.launch("fsdp", out)
    return out


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _files(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "manifest.json").read_text())["files"]


def test_the_runs_mix_sm_and_plain_processes_within_a_micro_batch(tmp_path):
    trainer = worker.trainer(tmp_path)  # micro-batch (step, rank) of 2 processes without accumulation: 2 * step + rank
    coins = [[trainer._sm_coin(2 * step + rank) for rank in range(2)] for step in range(worker.STEPS)]
    assert any(a != b for a, b in coins) and any(a and b for a, b in coins), coins


def test_two_processes_match_one_with_twice_the_accumulation(runs, tmp_path):
    worker.trainer(tmp_path / "one", grad_accum=2, save_every=worker.STEPS).train()
    fsdp, one = runs / "fsdp", tmp_path / "one"
    assert json.loads((fsdp / "summary.json").read_text())["config"]["fsdp"] is True
    a, b = _metrics(fsdp), _metrics(one)
    assert len(a) == len(b) == worker.STEPS
    for x, y in zip(a, b):
        assert x["sm_share"] == y["sm_share"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    validation = [json.loads((run / "summary.json").read_text())["validation"]["nll"] for run in (fsdp, one)]
    assert validation[0] == pytest.approx(validation[1], rel=1e-6)
    # The checkpoint holds the files of one process, full tensors under the same names.
    sharded, single = latest_checkpoint(fsdp / "checkpoints"), latest_checkpoint(one / "checkpoints")
    assert _files(sharded).keys() == _files(single).keys()
    pairs = [(sharded / name, single / name) for name in WEIGHT_FILES] + [(fsdp / FINAL, one / FINAL)]
    for path, reference in pairs:
        x, y = load_file(str(path)), load_file(str(reference))
        assert x.keys() == y.keys(), path
        for key in y:
            torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-6, msg=f"{path}: {key}")
    x, y = (torch.load(c / "optimizer.pt", weights_only=True)["optimizer"]["state"] for c in (sharded, single))
    assert x.keys() == y.keys() and "soft_mask.raw_scale" in y
    for key in y:
        torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-6, msg=key)


def test_the_sharded_ema_is_saved_whole_and_resumes_exactly(runs):
    straight, resumed = (
        latest_checkpoint(runs / "fsdp" / "checkpoints"),
        latest_checkpoint(runs / "resumed" / "checkpoints"),
    )
    ema = load_file(str(straight / EMA_WEIGHTS))
    assert ema["shadow.backbone.vocab_embed.embedding"].shape == (TINY_MDLM.vocab_size, TINY_MDLM.hidden_dim)
    assert int(ema["num_updates"]) == worker.STEPS
    # Byte for byte: the weights, the EMA, the SM parameters, and the final (EMA) model.
    for name in WEIGHT_FILES:
        assert _files(straight)[name]["sha256"] == _files(resumed)[name]["sha256"], name
    final = [load_file(str(run / FINAL)) for run in (runs / "fsdp", runs / "resumed")]
    assert all(torch.equal(final[0][key], final[1][key]) for key in final[0])
    assert _metrics(runs / "resumed")[-1] == _metrics(runs / "fsdp")[-1]


def test_fsdp_in_one_process_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="single process.*torchrun --nproc_per_node N"):
        worker.trainer(tmp_path, fsdp=True)
