"""Static K/V cache for block-wise diffusion decoding (gpt-fast's pattern: buffers preallocated once, written in place).

A masked diffusion LM attends bidirectionally, so a cache is an approximation: the K/V of positions that a forward
does not run are those of an earlier forward. The decoding engine uses one :class:`KVCache` per run:

- a *fill* forward runs the whole sequence with ``kv_cache=cache.at(all columns)`` and writes every position's K/V;
- a *window* forward runs only the columns ``cols`` (a contiguous window, e.g. the current block) with
  ``kv_cache=cache.at(cols)``: each layer writes the window's fresh K/V into its columns, then the window's queries
  attend to all ``T`` cached columns (the other positions' K/V being those of the last forward that wrote them).

K is stored after the rotary embedding (each position's own angle), so cached keys need no recomputation. Shapes
never change between forwards of one window length, and the columns are a device tensor, so forwards stay
capturable in CUDA graphs (the window's columns may change between replays).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CacheView", "KVCache", "LayerCache"]


class KVCache:
    """K and V buffers ``[B, T, n_kv_heads, head_dim]`` for each of ``layers`` attention layers.

    Args:
        layers: number of attention layers; batch, length: ``B`` sequences of ``T`` positions;
        kv_heads, head_dim: the attention's K/V shape; dtype, device: those of the model's activations.
    """

    def __init__(
        self,
        *,
        layers: int,
        batch: int,
        length: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch, length, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.batch, self.length = batch, length

    @classmethod
    def for_model(cls, model: nn.Module, *, batch: int, length: int) -> KVCache:
        """A cache sized from ``model.config`` (``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``) in the
        dtype and on the device of its input embeddings."""
        config: Any = model.config
        weight = model.get_input_embeddings().weight
        return cls(
            layers=config.num_hidden_layers,
            batch=batch,
            length=length,
            kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            dtype=weight.dtype,
            device=weight.device,
        )

    def at(self, columns: Tensor) -> CacheView:
        """The cache as one forward sees it: it runs the positions ``columns`` (int64 ``[Q]``, ascending)."""
        return CacheView(self, columns)


class CacheView:
    """What a model forward receives as ``kv_cache``: the cache and the columns of the positions it runs."""

    def __init__(self, cache: KVCache, columns: Tensor) -> None:
        self.cache, self.columns = cache, columns

    @property
    def length(self) -> int:
        """``T``, the number of key positions every query attends to."""
        return self.cache.length

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self.cache.keys[index], self.cache.values[index], self.columns)


class LayerCache:
    """One attention layer's K/V buffers and the columns the current forward runs."""

    def __init__(self, keys: Tensor, values: Tensor, columns: Tensor) -> None:
        self.keys, self.values, self.columns = keys, values, columns

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the forward's ``k``, ``v`` ``[B, Q, n_kv_heads, head_dim]`` (rotated) into their columns; returns
        the layer's whole ``K``, ``V`` ``[B, T, n_kv_heads, head_dim]``."""
        self.keys.index_copy_(1, self.columns, k)
        self.values.index_copy_(1, self.columns, v)
        return self.keys, self.values
