"""Exponential moving average (EMA) of a model's weights, as MDLM keeps it (decay 0.9999, used for evaluation).

After every optimizer step, ``shadow <- shadow - (1 - d) * (shadow - param)`` with ``d = min(decay, (1 + n) / (10 +
n))`` at update ``n`` (MDLM's warm-up of the decay, so the first averages follow the weights closely). Shadows are
fp32 and keyed by parameter name, so the state saves and resumes exactly and survives a change of parameter order.
For a model sharded by FSDP each shadow is sharded like its parameter (a DTensor: every process averages its own
shard); :meth:`EMA.load_state_dict` takes full tensors and keeps each process's shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["EMA"]


class EMA:
    """The moving average of ``model``'s trainable parameters.

    Args:
        model: the module whose ``named_parameters()`` with ``requires_grad`` are averaged.
        decay: the asymptotic decay in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be a number in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in self._params(model)}

    @staticmethod
    def _params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        return ((name, p) for name, p in model.named_parameters() if p.requires_grad)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights into the average (call after each optimizer step)."""
        keep = 1.0 - self.current_decay()
        self.num_updates += 1
        for name, p in self._params(model):
            shadow = self.shadow[name]
            shadow.sub_(keep * (shadow - p.detach().float()))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averages into ``model``'s parameters (cast to their dtypes)."""
        for name, p in self._params(model):
            p.copy_(self.shadow[name])

    @contextlib.contextmanager
    def averaged(self, model: nn.Module) -> Iterator[nn.Module]:
        """``with ema.averaged(model):`` the model holds the averages; its own weights come back afterwards."""
        saved = {name: p.detach().clone() for name, p in self._params(model)}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in self._params(model):
                    p.copy_(saved[name])

    def state_dict(self) -> dict[str, Tensor | float | int]:
        """Flat dict of tensors and numbers (safetensors-friendly: ``shadow.<name>`` tensors + two scalars); sharded
        shadows stay sharded (:func:`softmask_ext.training.fsdp.gather_full_tensors` makes them whole)."""
        return {
            "decay": torch.tensor(self.decay, dtype=torch.float64),
            "num_updates": torch.tensor(self.num_updates, dtype=torch.int64),
            **{f"shadow.{name}": t for name, t in self.shadow.items()},
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a :meth:`state_dict` whose shadows are full tensors (the same in every process when sharded)."""
        shadows = {k.removeprefix("shadow."): v for k, v in state.items() if k.startswith("shadow.")}
        if shadows.keys() != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - shadows.keys()), sorted(shadows.keys() - self.shadow.keys())
            raise ValueError(f"EMA state does not match the model: missing {missing[:8]}, unexpected {extra[:8]}")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for name, value in shadows.items():
            shadow = self.shadow[name]
            if isinstance(shadow, DTensor):  # every process holds the full value: each keeps its shard, no traffic
                value = distribute_tensor(
                    value.to(shadow.device), shadow.device_mesh, shadow.placements, src_data_rank=None
                )
            shadow.copy_(value)
