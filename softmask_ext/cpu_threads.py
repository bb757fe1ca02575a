"""CPU threads on shared machines: an OpenMP wait policy and a thread count that a busy neighbour cannot wreck.

PyTorch's CPU kernels run on OpenMP. By default every OpenMP worker spins (busy-waits) at the end of each parallel
region before it sleeps, and there is one worker per core. Beside one other busy process on a 2-core machine the
worker sharing a core with it is descheduled for whole time slices while the others spin waiting for it, and a
fine-tuning run of the shipped model slowed 15-20x. With the ``PASSIVE`` wait policy a waiting worker sleeps at
once, giving its core to whoever needs it, and the slowdown stays near the share of the machine the neighbour takes
(``benchmarks/shared_cpu.py`` measures it; results in ``benchmarks/results/shared_cpu.json``).

The knobs (both standard; set them to override what this module chooses):

* ``OMP_WAIT_POLICY``: ``PASSIVE`` unless set. The OpenMP runtime reads it once, when torch loads it, so it is set
  when ``softmask_ext`` is imported before torch (always so for ``python -m softmask_ext.<tool>``); a program that
  imports torch first keeps the runtime's default.
* ``OMP_NUM_THREADS``: the intra-op thread count; unless set, the CLIs use the CPUs this process may run on (its
  affinity mask, and the cgroup CPU quota of a container).
"""

from __future__ import annotations

import math
import os
import sys

__all__ = ["set_openmp_defaults", "usable_cpus", "configure_cpu_threads"]

WAIT_POLICY = "PASSIVE"


def set_openmp_defaults() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless it is set already or torch (and with it OpenMP) is already loaded."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (``cpu.max``)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def configure_cpu_threads() -> int:
    """Set torch's intra-op threads to ``OMP_NUM_THREADS`` when given, else to :func:`usable_cpus`; returns it."""
    import torch

    requested = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = int(requested) if requested.isdigit() and int(requested) > 0 else usable_cpus()
    torch.set_num_threads(threads)
    return threads
