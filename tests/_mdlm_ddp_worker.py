"""Two gloo processes of MDLM training for tests/test_mdlm_training.py::test_two_processes_match_one:
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_mdlm_ddp_worker.py RUN_DIR``."""

from __future__ import annotations

import sys

import torch
from test_mdlm_training import DDP_SETTINGS, _blocks, _model

from softmask_ext.training.distributed import init_distributed
from softmask_ext.training.mdlm_trainer import MDLMTrainer, mdlm_preset

if __name__ == "__main__":
    env = init_distributed(torch.device("cpu"))
    config = mdlm_preset("mdlm-sm-paper", run_dir=sys.argv[1], grad_accum=1, **DDP_SETTINGS)
    MDLMTrainer(_model(), config, _blocks(24), _blocks(4, seed=1), env=env).train()
