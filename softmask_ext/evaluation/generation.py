"""Batched calls of the decoding engine for the evaluation tasks: generation after a prompt, and infilling.

Prompts of different lengths are left-padded (Dream's convention: an attention mask, positions from its cumulative
sum) and decoded together; each row's decoded tokens are returned without the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..decoding import diffusion_generate
from ..soft_mask import SoftMask

__all__ = ["generate_tokens", "infill_tokens", "steps_until_decoded"]


def _left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor | None]:
    """int64 ``[B, P]`` left-padded prompts and their attention mask (None when no row is padded)."""
    if not prompts:
        raise ValueError("need at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask if bool((attention_mask == 0).any()) else None


def _decode(model: nn.Module, prompts: Sequence[Sequence[int]], pad_token_id: int, **kwargs: Any) -> Tensor:
    """Run the engine on left-padded prompts; returns the final canvas ``[B, P + N]`` (on the CPU)."""
    return _decode_with_history(model, prompts, pad_token_id, **kwargs)[0]


def _decode_with_history(
    model: nn.Module, prompts: Sequence[Sequence[int]], pad_token_id: int, output_history: bool = False, **kwargs: Any
) -> tuple[Tensor, list[Tensor] | None]:
    input_ids, attention_mask = _left_pad(prompts, pad_token_id)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = diffusion_generate(
            model,
            input_ids.to(device),
            attention_mask=None if attention_mask is None else attention_mask.to(device),
            output_history=output_history,
            return_dict_in_generate=True,
            **kwargs,
        )
    return out.sequences.cpu(), out.history


def generate_tokens(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    steps: int,
    pad_token_id: int,
    soft_mask: SoftMask | None = None,
    **decode: Any,
) -> list[list[int]]:
    """Decode ``max_new_tokens`` tokens after each prompt in ``steps`` steps; one batch, one engine call.

    prompts: token-id lists (at least one token each)
    decode:  further `diffusion_generate` settings (temperature, top_p, top_k, alg, alg_temp, eps, seed)
    returns: per prompt, its ``max_new_tokens`` generated token ids
    """
    canvas = _decode(
        model, prompts, pad_token_id, max_new_tokens=max_new_tokens, steps=steps, soft_mask=soft_mask, **decode
    )
    return canvas[:, canvas.shape[1] - max_new_tokens :].tolist()


def infill_tokens(
    model: nn.Module,
    prefixes: Sequence[Sequence[int]],
    suffixes: Sequence[Sequence[int]],
    *,
    span_length: int,
    steps: int,
    pad_token_id: int,
    fill_token_id: int,
    soft_mask: SoftMask | None = None,
    return_steps: bool = False,
    **decode: Any,
) -> list[list[int]] | tuple[list[list[int]], list[int]]:
    """Decode a span of ``span_length`` masks between each prefix and its suffix, in ``steps`` steps.

    Each prompt is its prefix, the span's masks, its suffix and, after shorter suffixes, ``fill_token_id`` (Dream ends
    a generation with eos), so that the spans line up; the engine decodes the masks in the prompts
    (``max_new_tokens=0``), ``span_length / steps`` tokens per step, without hooks (a CUDA graph on the GPU).

    returns: per example, the ``span_length`` decoded token ids; with ``return_steps``, also per example the steps
    its span took (with a ``threshold`` a row can finish before the batch does)
    """
    if len(prefixes) != len(suffixes):
        raise ValueError(f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes")
    mask_token_id = decode.pop("mask_token_id", None)
    if mask_token_id is None:
        mask_token_id = model.config.mask_token_id
    width = max(len(s) for s in suffixes)
    prompts = [
        [*prefix, *[mask_token_id] * span_length, *suffix, *[fill_token_id] * (width - len(suffix))]
        for prefix, suffix in zip(prefixes, suffixes)
    ]
    canvas, history = _decode_with_history(
        model,
        prompts,
        pad_token_id,
        output_history=return_steps,
        max_new_tokens=0,
        steps=steps,
        soft_mask=soft_mask,
        mask_token_id=mask_token_id,
        **decode,
    )
    end = canvas.shape[1] - width
    spans = canvas[:, end - span_length : end].tolist()
    if not return_steps:
        return spans
    return spans, steps_until_decoded(history, slice(end - span_length, end), mask_token_id)


def steps_until_decoded(history: Sequence[Tensor], positions: slice | Sequence[int], mask_token_id: int) -> list[int]:
    """Per row, the steps it took until its ``positions`` held no mask token (with a ``threshold`` a row can finish
    before the batch does); a row never finished counts every step.

    history:   the canvas after each step, ``S`` tensors int64 ``[B, T]`` (``diffusion_generate(...,
               output_history=True, return_dict_in_generate=True).history``)
    positions: the positions of ``T`` that count, a slice or a list of indices
    returns:   ``B`` step counts, each in ``1 .. S``
    """
    done = torch.stack([(x[:, positions] != mask_token_id).all(-1).cpu() for x in history])  # [S, B]
    return (done.long().argmax(0) + 1).where(done.any(0), torch.tensor(len(history))).tolist()
