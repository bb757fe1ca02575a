"""Decoding settings and the checks that turn bad input into clear errors before any work is done."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .sampling import ALGS, REMASKING

__all__ = ["CACHE_MODES", "DecodeOptions", "Prompt", "check_prompt"]

# none: every step runs the whole sequence; prefix: K/V before the block cached once per block; dual: the suffix's too.
CACHE_MODES: tuple[str, ...] = ("none", "prefix", "dual")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding parameters, validated on construction: Dream's (``alg`` in :data:`ALGS`) or LLaDA's (``alg`` one of
    its remasking rules, :data:`REMASKING`), and the block-wise settings shared by both.

    Block-wise settings: ``block_length`` (``None``: one block over the whole decoded region), ``threshold``
    (confidence-threshold parallel decoding instead of fixed per-step counts), ``cache`` (one of
    :data:`CACHE_MODES`), ``cfg_scale`` (classifier-free guidance, the prompt masked for the unconditional pass) and
    ``fast_dllm_compat`` (Fast-dLLM's Dream loop: its refresh forward commits the block's first position, and its
    fixed-count steps rank by negative entropy whatever ``alg`` says).
    """

    max_new_tokens: int
    steps: int
    mask_token_id: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    alg: str = "origin"
    alg_temp: float | None = None
    eps: float = 1e-3
    block_length: int | None = None
    threshold: float | None = None
    cache: str = "none"
    cfg_scale: float = 0.0
    fast_dllm_compat: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        if not _is_int(self.mask_token_id) or self.mask_token_id < 0:
            raise ValueError(f"mask_token_id must be a non-negative int, got {self.mask_token_id!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
        if self.alg not in ALGS + REMASKING:
            raise ValueError(f"unknown alg {self.alg!r}; expected one of {ALGS} (Dream) or {REMASKING} (LLaDA)")
        if self.alg_temp is not None and (not _is_number(self.alg_temp) or self.alg_temp < 0):
            raise ValueError(f"alg_temp must be a finite number >= 0 or None, got {self.alg_temp!r}")
        if not _is_number(self.eps) or not 0 <= self.eps < 1:  # eps = 0: s = 0 only on the last step, as in Dream
            raise ValueError(f"eps must be in [0, 1), got {self.eps!r}")
        self._check_blocks()

    def _check_blocks(self) -> None:
        if self.block_length is not None and (not _is_int(self.block_length) or self.block_length < 1):
            raise ValueError(f"block_length must be an int >= 1 or None, got {self.block_length!r}")
        if self.threshold is not None:
            if not _is_number(self.threshold) or not 0 < self.threshold <= 1:
                raise ValueError(f"threshold must be in (0, 1] or None, got {self.threshold!r}")
            if self.alg == "origin" and not self.fast_dllm_compat:
                raise ValueError(
                    "threshold needs a confidence: alg 'origin' has none (use maskgit_plus, "
                    "topk_margin, entropy, low_confidence or random)"
                )
            if self.alg_temp:
                raise ValueError("threshold and alg_temp cannot be combined: a threshold unmasks by confidence")
            if self.alg == "entropy" and not self.fast_dllm_compat:
                warnings.warn(
                    "threshold with alg='entropy' compares negative entropies (<= 0) with a threshold in (0, 1]: only "
                    "the most confident position passes, one token per step; for parallel decoding use "
                    "alg='maskgit_plus' (the drawn token's probability, Fast-dLLM's confidence)",
                    UserWarning,
                    stacklevel=4,
                )
        if self.cache not in CACHE_MODES:
            raise ValueError(f"unknown cache {self.cache!r}; expected one of {CACHE_MODES}")
        if not _is_number(self.cfg_scale) or self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {self.cfg_scale!r}")
        if self.fast_dllm_compat and (self.alg not in ALGS or self.cache == "none"):
            raise ValueError(
                "fast_dllm_compat reproduces Fast-dLLM's cached Dream loop: it needs a Dream alg and "
                "cache='prefix' or 'dual'"
            )

    @property
    def llada(self) -> bool:
        """LLaDA's rules: Gumbel-max sampling and evenly split per-step counts (else Dream's)."""
        return self.alg in REMASKING

    def check_vocab(self, vocab_size: int) -> None:
        if self.mask_token_id >= vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary [0, {vocab_size})")


@dataclass(frozen=True)
class Prompt:
    """A validated batch of prompts on the model's device.

    Attributes:
        input_ids: int64 ``[B, P]``, left-padded; mask tokens in it are decoded along with the new tokens.
        attention_mask: bool ``[B, P]``, or ``None`` when no row is padded (Dream then attends to everything).
        first_mask: the first column holding a mask token in any row (``P`` when none does): decoding starts there.
        most_masks: the masks to decode in the row with the most (its prompt's plus ``max_new_tokens``).
    """

    input_ids: Tensor
    attention_mask: Tensor | None
    first_mask: int
    most_masks: int

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


def check_prompt(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    options: DecodeOptions,
    *,
    vocab_size: int,
    max_positions: int | None,
    device: torch.device,
) -> Prompt:
    """Validate prompts once, on the host, so that the decoding steps need no checks (and no syncs)."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a 2-D [batch, prompt_len] tensor, got {_describe(input_ids)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(
            f"input_ids must hold at least one prompt of at least one token, got shape {list(input_ids.shape)}"
        )
    total = length + options.max_new_tokens
    if max_positions is not None and total > max_positions:
        raise ValueError(
            f"prompt length {length} + max_new_tokens {options.max_new_tokens} = {total} exceeds the model's "
            f"maximum of {max_positions} positions"
        )
    options.check_vocab(vocab_size)
    input_ids = input_ids.to(device=device, dtype=torch.int64)
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), got values in [{low}, {high}]")
    masks = input_ids == options.mask_token_id
    most_masks = _check_mask_count(masks.sum(-1), options)
    columns = masks.any(0).nonzero()
    first_mask = int(columns[0]) if columns.numel() else length
    if attention_mask is None:
        return Prompt(input_ids, None, first_mask, most_masks)
    if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"attention_mask must have the shape of input_ids {[batch, length]}, got {_describe(attention_mask)}"
        )
    mask = attention_mask.to(device)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0/1 (or False/True)")
    mask = mask.bool()
    if not bool(mask[:, -1].all()):
        raise ValueError("every prompt must end with a real token: pad prompts on the left")
    # Left padding: once a row's real tokens start, they do not stop.
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError("attention_mask has padding after real tokens; pad prompts on the left")
    if bool((masks & ~mask).any()):
        raise ValueError(f"the left padding holds the mask token id {options.mask_token_id}; pad with another token")
    return Prompt(input_ids, mask if not bool(mask.all()) else None, first_mask, most_masks)


def _check_mask_count(prompt_masks: Tensor, options: DecodeOptions) -> int:
    """Some row must have something to decode; returns the masks of the row with the most (its prompt's plus the new
    tokens). ``steps`` may exceed any row's count: as in Dream, a step whose share rounds to 0 unmasks nothing."""
    most = int(prompt_masks.max()) + options.max_new_tokens
    if most == 0:
        raise ValueError("nothing to decode: max_new_tokens is 0 and the prompts hold no mask token")
    return most


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__
