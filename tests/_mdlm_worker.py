"""MDLM training in two gloo processes, for tests/test_mdlm_training.py (DDP) and tests/test_mdlm_fsdp.py (FSDP):
:func:`launch` runs ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_mdlm_worker.py MODE OUT``.

The settings live here and the tests import them, so that their single-process runs use exactly the same ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _training_helpers import text_blocks, tiny_mdlm

from softmask_ext.training.distributed import DistEnv, init_distributed
from softmask_ext.training.mdlm_trainer import MDLMTrainer, mdlm_preset

STEPS = 3
# A global batch of 4: two processes with grad_accum=1 see what one process sees with grad_accum=2. At seed 2 and
# sm_prob 0.5 the processes disagree on SM in steps 1 and 3 and both take it in step 2.
SETTINGS = {
    "max_steps": STEPS,
    "batch_size": 4,
    "warmup_steps": 1,
    "sm_prob": 0.5,
    "ema": 0.9,
    "lr": 1e-3,
    "eval_batches": 1,
    "seed": 2,
}


def trainer(run_dir: Path, env: DistEnv | None = None, model_seed: int = 0, **overrides) -> MDLMTrainer:
    """The SM recipe on the tiny DiT with :data:`SETTINGS` and ``overrides``."""
    config = mdlm_preset("mdlm-sm-paper", run_dir=str(run_dir), **{**SETTINGS, **overrides})
    return MDLMTrainer(tiny_mdlm(model_seed), config, text_blocks(24), text_blocks(4, seed=1), env=env)


def launch(mode: str, out: Path) -> None:
    """Run :func:`main` in two torchrun processes (``mode`` "ddp" or "fsdp"), writing under ``out``."""
    tests = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, __file__, mode, str(out)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def main(mode: str, out: Path) -> None:
    env = init_distributed(torch.device("cpu"))
    assert env.world_size == 2, "launch with --nproc_per_node 2"
    if mode == "ddp":
        trainer(out / "ddp", env, grad_accum=1).train()
    else:
        fsdp = dict(grad_accum=1, fsdp=True, save_every=STEPS)
        straight = trainer(out / "fsdp", env, **fsdp)
        assert straight.sharded
        straight.train()
        # The same run stopped after 2 steps, then continued from its checkpoint by new objects (other initial weights).
        first = trainer(out / "resumed", env, **fsdp)
        for _ in range(2):
            first.train_step()
        first.save_checkpoint()
        trainer(out / "resumed", env, model_seed=5, **fsdp).train()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
