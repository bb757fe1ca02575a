"""Dream's time schedule, computed once on the host.

``timesteps = linspace(1, eps, steps + 1)``; step ``i`` goes from ``t = timesteps[i]`` to ``s = timesteps[i + 1]``
and unmasks a fraction ``1 - s/t`` of what is still masked (all of it on the last step). The ratios are computed in
float32 exactly as Dream computes them, so the counts derived from them on the device match the reference bit for
bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["step_ratios"]


def step_ratios(steps: int, eps: float) -> Tensor:
    """float32 ``[steps]``: ``1 - s/t`` per step, 1 for the last step."""
    ts = torch.linspace(1, eps, steps + 1, dtype=torch.float32)
    ratios = 1 - ts[1:] / ts[:-1]
    ratios[-1] = 1.0
    return ratios
