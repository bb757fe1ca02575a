"""Process-group setup for ``torchrun`` (DDP or FSDP): gloo on CPU, nccl on GPU; a no-op for a single process."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "all_reduce_sum", "average_gradients", "barrier"]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistEnv:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank)


def all_reduce_sum(value: float, env: DistEnv, device: torch.device) -> float:
    """Sum a python number over all processes."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def average_gradients(params: Iterable[torch.nn.Parameter], env: DistEnv) -> None:
    """Average the gradients of replicated parameters over all processes, as DDP does: a process where a parameter
    got no gradient contributes zeros, and a parameter no process used keeps ``grad=None`` (so the optimizer gives it
    no state, as in one process). Collective: call it in every process with the same parameters."""
    params = list(params)
    if not env.distributed or not params:
        return
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(used)
    for p, anywhere in zip(params, used.tolist()):
        if anywhere:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)
            p.grad = grad.div_(env.world_size)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
