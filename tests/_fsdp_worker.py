"""FSDP runs for tests/test_training_fsdp.py, all in one ``torchrun`` launch (2 gloo processes) to pay the start-up
once: ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_fsdp_worker.py OUT MODEL DATA``.

The settings live here and the test imports them, so that its single-process runs use exactly the same ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _training_helpers import random_examples, tiny_model

from softmask_ext import SoftMask
from softmask_ext.finetune import main as finetune
from softmask_ext.training import AdapterConfig, DistEnv, TrainConfig, Trainer, init_distributed

DATA = random_examples(48)
VAL = random_examples(10, seed=1)  # 5 validation batches of 2: the two processes get 3 and 2 (FSDP pads one)
LORA = AdapterConfig(kind="lora", rank=4, alpha=8.0, dropout=0.0)
DORA = AdapterConfig(kind="dora", rank=4, alpha=8.0, dropout=0.0)
STEPS = 3


def cli_args(model: Path, data: Path, out: Path, name: str) -> list[str]:
    """Full fine-tuning with gradient checkpointing through the CLI (add --grad-accum)."""
    return [
        "--model",
        str(model),
        "--data",
        str(data),
        "--val-data",
        str(data),
        "--output-dir",
        str(out),
        "--name",
        name,
        "--max-steps",
        str(STEPS),
        "--batch-size",
        "2",
        "--lr",
        "3e-3",
        "--sm-lr",
        "0.1",
        "--sm-prob",
        "0.5",
        "--eval-batches",
        "3",
        "--max-length",
        "128",
        "--device",
        "cpu",
        "--full",
        "--gradient-checkpointing",
    ]


def config(run_dir: Path, **overrides) -> TrainConfig:
    """Per-process batch 2; one process uses grad_accum=2 to see the same global batch as two processes."""
    fields = dict(
        run_dir=str(run_dir),
        max_steps=STEPS,
        batch_size=2,
        grad_accum=1,
        lr=3e-3,
        sm_lr=0.1,
        sm_prob=0.5,
        seed=3,
        eval_batches=5,
    )
    return TrainConfig(**{**fields, **overrides})


def trainer(run_dir: Path, env: DistEnv | None = None, **overrides) -> Trainer:
    return Trainer(
        tiny_model(),
        DATA,
        config(run_dir, **overrides),
        val_data=VAL,
        device="cpu",
        env=env,
        soft_mask=SoftMask(k=1, scale=0.3, centre=-6.0, steepness=1.0),
    )


def resume_case(out: Path, env: DistEnv, name: str, adapter: AdapterConfig) -> None:
    """An uninterrupted FSDP run, and one stopped at step 2 and resumed by new objects from its checkpoint."""
    settings = dict(env=env, adapter=adapter, fsdp=True, max_steps=4, save_every=2)
    trainer(out / f"{name}-straight", **settings).train()
    trainer(out / f"{name}-interrupted", **settings).train(stop_at_step=2)
    resumed = trainer(out / f"{name}-interrupted", **settings)
    assert resumed.resume() and resumed.step == 2
    resumed.train()


def main(out: Path, model: Path, data: Path) -> None:
    env = init_distributed(torch.device("cpu"))
    assert env.world_size == 2, "launch with --nproc_per_node 2"
    finetune(cli_args(model, data, out, "cli-fsdp") + ["--grad-accum", "1", "--fsdp"])
    trainer(out / "lora-fsdp", env, adapter=LORA, fsdp=True).train()
    resume_case(out, env, "full", AdapterConfig(kind="full"))
    resume_case(out, env, "dora", DORA)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:4]))
