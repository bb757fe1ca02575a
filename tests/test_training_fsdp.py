"""FSDP: two gloo processes train exactly like one process with the same global batch (full fine-tuning through the
CLI with gradient checkpointing, LoRA through the API), resume under FSDP is exact, and --fsdp needs several
processes. The FSDP runs all happen in one torchrun launch (tests/_fsdp_worker.py)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import _fsdp_worker as worker
import pytest
import torch
import torch.distributed as dist
from _training_helpers import CODE, make_model_dir, tiny_model
from safetensors.torch import load_file

from softmask_ext import SoftMask
from softmask_ext.finetune import main as finetune
from softmask_ext.training import (
    AdapterConfig,
    DiffusionTrainingForward,
    DistEnv,
    apply_adapters,
    latest_checkpoint,
    micro_batch_index,
)
from softmask_ext.training.fsdp import ShardedTrainingForward, estimate_training_bytes, shard, use_fsdp


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    make_model_dir(out / "model")
    with open(out / "data.jsonl", "w") as f:
        for i, code in enumerate(CODE):
            f.write(json.dumps({"prompt": f"Write snippet {i % 7}.", "response": code}) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(worker.__file__)),
        str(out),
        str(out / "model"),
        str(out / "data.jsonl"),
    ]
    result = subprocess.run(launch, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def _assert_same_training(fsdp: Path, single: Path) -> None:
    a, b = _metrics(fsdp), _metrics(single)
    assert len(a) == len(b) == worker.STEPS
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"] and x["sm_share"] == y["sm_share"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    assert a[-1]["val_soft_mask"] == pytest.approx(b[-1]["val_soft_mask"], rel=1e-6)
    assert a[-1]["val_binary"] == pytest.approx(b[-1]["val_binary"], rel=1e-6)


def _assert_close_files(a: Path, b: Path) -> dict[str, torch.Tensor]:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for name, value in wb.items():
        torch.testing.assert_close(wa[name], value, rtol=1e-5, atol=1e-6, msg=name)
    return wb


def test_coins_mix_sm_and_plain_processes_within_a_step(tmp_path):
    """The runs below must cover a micro-batch on which one process takes the SM forward and the other does not
    (the plain process then runs the lockstep pass 1)."""
    trainer = worker.trainer(tmp_path)
    coins = [[trainer._sm_coin(micro_batch_index(s, 0, 1, r, 2)) for r in range(2)] for s in range(worker.STEPS)]
    assert any(a != b for a, b in coins), coins


def test_full_finetuning_through_the_cli_matches_one_process(runs, tmp_path):
    finetune(worker.cli_args(runs / "model", runs / "data.jsonl", tmp_path, "single") + ["--grad-accum", "2"])
    fsdp, single = runs / "cli-fsdp", tmp_path / "single"
    assert json.loads((fsdp / "train_config.json").read_text())["fsdp"] is True
    _assert_same_training(fsdp, single)
    final = _assert_close_files(fsdp / "final" / "model.safetensors", single / "final" / "model.safetensors")
    initial = load_file(str(runs / "model" / "model.safetensors"))
    assert any(not torch.equal(initial[n], final[n]) for n in final), "training changed nothing"
    # The checkpoint holds the full, unsharded weights in the usual format, and the SM config beside them.
    checkpoint = latest_checkpoint(fsdp / "checkpoints")
    _assert_close_files(checkpoint / "model" / "model.safetensors", single / "final" / "model.safetensors")
    assert (checkpoint / "transparency_config.json").exists() and (fsdp / "final" / "transparency_config.json").exists()


def test_lora_matches_one_process_and_sm_parameters_are_averaged(runs, tmp_path):
    trainer = worker.trainer(tmp_path / "lora-single", adapter=worker.LORA, grad_accum=2)
    trainer.train()
    fsdp, single = runs / "lora-fsdp", tmp_path / "lora-single"
    _assert_same_training(fsdp, single)
    adapters = _assert_close_files(
        fsdp / "final" / "adapter_model.safetensors", single / "final" / "adapter_model.safetensors"
    )
    assert adapters and all("lora_" in name for name in adapters)
    assert (fsdp / "final" / "adapter_config.json").exists()
    sm = "checkpoints/step-00000003/soft_mask.safetensors"
    moved = _assert_close_files(fsdp / sm, single / sm)
    assert abs(torch.sigmoid(moved["raw_scale"]).item() - 0.3) > 1e-3, "the SM scale should have trained"


@pytest.mark.parametrize("kind", ["full", "dora"])
def test_resume_under_fsdp_continues_exactly(runs, kind):
    straight, resumed = runs / f"{kind}-straight", runs / f"{kind}-interrupted"
    assert [r["loss"] for r in _metrics(straight)] == [r["loss"] for r in _metrics(resumed)]
    assert _metrics(straight)[-1]["val_soft_mask"] == _metrics(resumed)[-1]["val_soft_mask"]
    weights = "model.safetensors" if kind == "full" else "adapter_model.safetensors"
    for path in (f"final/{weights}", "checkpoints/step-00000004/soft_mask.safetensors"):
        a, b = load_file(str(straight / path)), load_file(str(resumed / path))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), path


def test_fsdp_in_one_process_is_a_clear_error(runs, tmp_path):
    with pytest.raises(ValueError, match="single process.*torchrun --nproc_per_node N"):
        worker.trainer(tmp_path / "api", fsdp=True)
    with pytest.raises(SystemExit, match="error: FSDP shards the model across processes"):
        finetune(worker.cli_args(runs / "model", runs / "data.jsonl", tmp_path, "cli") + ["--fsdp"])


def test_training_memory_estimate_and_automatic_choice():
    model = tiny_model()
    weights = sum(p.numel() for p in model.parameters()) * 4
    assert estimate_training_bytes(model) == 4 * weights, "fp32 weights + gradient + two AdamW moments"
    lora = apply_adapters(tiny_model(), AdapterConfig(kind="lora", rank=4))
    trained = sum(p.numel() for p in lora.parameters() if p.requires_grad) * 4
    assert estimate_training_bytes(lora) == weights + 4 * trained
    # Never chosen for one process, nor on CPUs (no GPU memory to exceed).
    assert not use_fsdp(False, DistEnv(), model, torch.device("cpu"))
    assert not use_fsdp(False, DistEnv(rank=0, world_size=2), model, torch.device("cpu"))


def test_bf16_policy_computes_in_bf16_and_keeps_fp32_sharded_gradients():
    """The --bf16 policy (bf16 compute, fp32 reduction) on the two-pass SM step with DoRA and gradient checkpointing,
    in a one-process group (the trainer uses it on GPUs only): the same logits as the unsharded model cast to bf16,
    fp32 gradients on the sharded adapters, and a gradient for the replicated SM scale."""
    torch.manual_seed(0)
    model = tiny_model()
    model.gradient_checkpointing_enable()
    model = apply_adapters(model, AdapterConfig(kind="dora", rank=4))
    soft_mask = SoftMask(k=1, scale=0.3, centre=-6.0, steepness=1.0)
    reference = DiffusionTrainingForward(copy.deepcopy(model).to(torch.bfloat16), copy.deepcopy(soft_mask), 1)
    x_t = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    x_t[:, 4:9] = 1  # the mask token of tiny_model
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        sharded = ShardedTrainingForward(model, soft_mask, 1)
        shard(sharded, DistEnv(), torch.device("cpu"), bf16=True)
        logits = sharded(x_t, None, True)
        logits.float().square().mean().backward()
        trained = [p for p in sharded.model.parameters() if p.requires_grad]
        assert logits.dtype == torch.bfloat16
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
        assert soft_mask.raw_scale.grad is not None and soft_mask.raw_scale.grad.abs() > 0
        torch.testing.assert_close(logits, reference(x_t, None, True))  # bf16 tolerances
    finally:
        dist.destroy_process_group()
