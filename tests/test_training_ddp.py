"""Two gloo processes (torchrun) train exactly like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from _training_helpers import CODE, make_model_dir
from safetensors.torch import load_file


def _run(args: list[str], cwd) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    model = make_model_dir(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for i, code in enumerate(CODE):
            f.write(json.dumps({"prompt": f"Write snippet {i % 7}.", "response": code}) + "\n")
    common = [
        "-m",
        "softmask_ext.finetune",
        "--model",
        str(model),
        "--data",
        str(data),
        "--val-data",
        str(data),
        "--output-dir",
        str(tmp_path / "runs"),
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--lr",
        "3e-3",
        "--sm-lr",
        "0.1",
        "--sm-prob",
        "0.5",
        "--eval-batches",
        "2",
        "--max-length",
        "128",
        "--device",
        "cpu",
        "--full",
    ]
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *common,
            "--grad-accum",
            "1",
            "--name",
            "ddp",
        ],
        tmp_path,
    )
    _run([sys.executable, *common, "--grad-accum", "2", "--name", "single"], tmp_path)

    def metrics(name):
        return [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]

    ddp, single = metrics("ddp"), metrics("single")
    assert len(ddp) == len(single) == 3
    for a, b in zip(ddp, single):
        assert a["tokens"] == b["tokens"] and a["sm_share"] == b["sm_share"]
        assert abs(a["loss"] - b["loss"]) < 1e-5 * max(1.0, abs(b["loss"]))
    assert 0 < single[-1]["sm_share"] < 1, "the test should mix SM and plain micro-batches"
    assert abs(ddp[-1]["val_soft_mask"] - single[-1]["val_soft_mask"]) < 1e-4
    w_ddp = load_file(str(tmp_path / "runs" / "ddp" / "final" / "model.safetensors"))
    w_single = load_file(str(tmp_path / "runs" / "single" / "final" / "model.safetensors"))
    initial = load_file(str(model / "model.safetensors"))
    for name, value in w_single.items():
        torch.testing.assert_close(w_ddp[name], value, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(initial[n], w_single[n]) for n in w_single), "training changed nothing"
    for name in ("ddp", "single"):
        assert (tmp_path / "runs" / name / "transparency_config.json").exists()
