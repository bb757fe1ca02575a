"""``diffusion_generate``: Dream's decoding interface on top of the engine, with optional soft-masking."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..soft_mask import SoftMask
from .engine import DiffusionDecoder, LogitsHook, TokensHook
from .options import DecodeOptions, check_prompt

__all__ = ["DecodeResult", "diffusion_generate"]

# Keyword prefixes of the authors' transparency_config.json, accepted as keyword arguments.
_SOFT_MASK_PREFIXES = ("transparency_", "mixinputs_", "mixture_")


@dataclass
class DecodeResult:
    """What ``diffusion_generate(..., return_dict_in_generate=True)`` returns.

    Attributes:
        sequences: int64 ``[B, P + N]``, prompts followed by the generated tokens.
        history: the canvas after each step (``steps`` tensors ``[B, P + N]``) when ``output_history=True``.
    """

    sequences: Tensor
    history: list[Tensor] | None = None


def diffusion_generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    steps: int | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    alg: str = "origin",
    alg_temp: float | None = None,
    eps: float = 1e-3,
    output_history: bool = False,
    return_dict_in_generate: bool = False,
    generation_tokens_hook_func: TokensHook | None = None,
    generation_logits_hook_func: LogitsHook | None = None,
    soft_mask: SoftMask | Mapping[str, Any] | str | os.PathLike | None = None,
    mask_token_id: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    cuda_graph: bool | None = None,
    **soft_mask_kwargs: Any,
) -> Tensor | DecodeResult:
    """Masked-diffusion decoding as Dream's reference ``diffusion_generate``, with optional soft-masking.

    Args:
        model: a :class:`softmask_ext.DreamModel` (or a module with its forward signature, ``config`` and
            ``get_input_embeddings()``).
        input_ids: int64 ``[B, P]`` prompts, left-padded when their lengths differ. Mask tokens in them are decoded
            too, as Dream does (infilling: prefix, masks, suffix, and ``max_new_tokens=0``).
        attention_mask: ``[B, P]`` 1 for tokens, 0 for left padding (positions are ``cumsum(mask) - 1``).
        max_new_tokens: ``N >= 0``, tokens generated after each prompt.
        steps: denoising steps, at least 1 and at most the masks of the row with the most (its prompt's plus ``N``);
            default: that number, one token per step.
        temperature, top_p, top_k: Dream's filters and sampling (``temperature == 0``: argmax).
        alg: ``"origin"`` (each mask unmasks with probability ``1 - s/t``), ``"maskgit_plus"`` (most probable
            first), ``"topk_margin"`` (largest top-1 minus top-2 first), ``"entropy"`` (lowest entropy first).
        alg_temp: when > 0, the positions to unmask are sampled from ``softmax(confidence / alg_temp)``.
        eps: final time of ``timesteps = linspace(1, eps, steps + 1)``.
        output_history, return_dict_in_generate: as in Dream; history needs both.
        generation_tokens_hook_func: ``f(step, x, logits) -> x``, called before the first step (``step=None``) and
            after each step's unmasking; it may edit the decoded region (from the first mask token of any prompt on).
        generation_logits_hook_func: ``f(step, x, logits) -> logits`` on the full logits ``[B, P + N, V]``, row i predicting position i.
            Either hook makes the loop compute logits for every position and run eagerly.
        soft_mask: a :class:`SoftMask`, a ``transparency_config`` dict or a path to one; the authors' keywords
            (``transparency_scale=..., mixinputs_k=...``) are accepted instead. ``None``: plain (binary) masks.
        mask_token_id: default ``model.config.mask_token_id``.
        generator, seed: source of randomness for sampling (one or neither; default: torch's global generator).
        cuda_graph: capture the step in a CUDA graph (default: on CUDA).

    Returns:
        int64 ``[B, P + N]``, or a :class:`DecodeResult` when ``return_dict_in_generate``.

    Where this differs from Dream's code (the tests' oracle follows the same rules):
        - confidences are computed in fp32 whatever the model's dtype, and equal confidences go to the earlier
          position (Dream ranks in the logits' dtype with ``torch.topk``, whose order of ties is unspecified);
        - the number to unmask comes from each row's own mask count, not the batch mean: the same whenever rows hold
          equally many masks (not so when prompts hold different numbers of mask tokens), so a prompt's tokens never
          depend on its batch;
        - samples are drawn by inverting the CDF (fp64 sums) and by Gumbel-top-k (same distributions as Dream's
          ``Categorical`` and ``multinomial``; see :mod:`.sampling`);
        - top-p keeps every token tied with the last one in the nucleus (Dream's sort leaves their order, and so which
          of them stay, unspecified);
    """
    unknown = sorted(k for k in soft_mask_kwargs if not k.startswith(_SOFT_MASK_PREFIXES))
    if unknown:
        raise TypeError(f"diffusion_generate() got unexpected keyword arguments {unknown}")
    config = model.config
    if mask_token_id is None:
        mask_token_id = getattr(config, "mask_token_id", None)
        if mask_token_id is None:
            raise ValueError("the model's config has no mask_token_id; pass mask_token_id=")
    options = DecodeOptions(
        max_new_tokens=max_new_tokens,
        steps=1 if steps is None else steps,  # None: one token per step, once the prompts' masks are counted
        mask_token_id=mask_token_id,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        alg=alg,
        alg_temp=alg_temp,
        eps=eps,
    )
    device = model.get_input_embeddings().weight.device
    prompt = check_prompt(
        input_ids,
        attention_mask,
        options,
        vocab_size=config.vocab_size,
        max_positions=getattr(config, "max_position_embeddings", None),
        device=device,
    )
    if steps is None:
        options = dataclasses.replace(options, steps=prompt.most_masks)
    decoder = DiffusionDecoder(
        model,
        options,
        batch=prompt.batch,
        prompt_len=prompt.length,
        padded=prompt.attention_mask is not None,
        decode_from=prompt.first_mask,
        soft_mask=_soft_mask_on(SoftMask.from_any(soft_mask, **soft_mask_kwargs), device),
        generator=_generator(generator, seed, device),
        cuda_graph=cuda_graph,
    )
    sequences, history = decoder.run(
        prompt,
        tokens_hook=generation_tokens_hook_func,
        logits_hook=generation_logits_hook_func,
        output_history=output_history and return_dict_in_generate,
    )
    return DecodeResult(sequences, history) if return_dict_in_generate else sequences


def _soft_mask_on(soft_mask: SoftMask | None, device: torch.device) -> SoftMask | None:
    """The SM module with its parameters on ``device``; a caller's module on another device is copied, not moved."""
    if soft_mask is None or soft_mask.raw_scale.device == device:
        return soft_mask
    return copy.deepcopy(soft_mask).to(device)


def _generator(generator: torch.Generator | None, seed: int | None, device: torch.device) -> torch.Generator | None:
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        return torch.Generator(device=device).manual_seed(seed)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"the generator is on {generator.device} but the model is on {device}")
    return generator
