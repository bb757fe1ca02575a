"""``diffusion_generate``: Dream's decoding interface on top of the engine, with optional soft-masking."""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..model.family import family_of
from ..soft_mask import SoftMask
from .engine import DiffusionDecoder, LogitsHook, TokensHook
from .generation_config import GENERATION_FIELDS, new_token_count, resolve_generation_config
from .mdlm_samplers import generate_from_diffusion_api, is_mdlm_model
from .options import DecodeOptions, Prompt, check_prompt
from .sampling import REMASKING

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
    generation_config: Any = None,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    steps: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    alg: str | None = None,
    alg_temp: float | None = None,
    eps: float | None = None,
    num_return_sequences: int | None = None,
    output_history: bool | None = None,
    return_dict_in_generate: bool | None = None,
    generation_tokens_hook_func: TokensHook | None = None,
    generation_logits_hook_func: LogitsHook | None = None,
    soft_mask: SoftMask | Mapping[str, Any] | str | os.PathLike | None = None,
    mask_token_id: int | None = None,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    cuda_graph: bool | None = None,
    block_length: int | None = None,
    threshold: float | None = None,
    cache: str | None = None,
    use_cache: bool = False,
    dual_cache: bool = False,
    fast_dllm_compat: bool = False,
    remasking: str | None = None,
    cfg_scale: float | None = None,
    **soft_mask_kwargs: Any,
) -> Tensor | DecodeResult:
    """Masked-diffusion decoding as Dream's reference ``diffusion_generate`` (or LLaDA's ``generate`` for LLaDA
    models), block-wise with K/V caches and threshold parallel decoding as Fast-dLLM, with optional soft-masking.

    Args:
        model: a :class:`softmask_ext.DreamModel`, a LLaDA model, or a module with their forward signature,
            ``config``, ``get_input_embeddings()`` and a model family.
        input_ids: int64 ``[B, P]`` prompts, left-padded when their lengths differ. Mask tokens in them are decoded
            too, as Dream does (infilling: prefix, masks, suffix, and ``max_new_tokens=0``).
        attention_mask: ``[B, P]`` 1 for tokens, 0 for left padding (positions are ``cumsum(mask) - 1``).
        generation_config: Dream's ``DreamGenerationConfig`` (or any object with its attributes) or a dict of its
            fields (:data:`.generation_config.GENERATION_FIELDS`); a keyword below that is not ``None`` wins over it.
        max_new_tokens: ``N >= 0``, tokens generated after each prompt.
        max_length: instead of ``max_new_tokens`` (which wins when both are given): the total length ``P + N``.
            Neither: Dream's default, 20 new tokens (capped at the model's positions), with Dream's warning.
        steps: denoising steps, at least 1; default: the masks of the row with the most (its prompt's plus ``N``),
            one token per step. More steps than masks is allowed, as in Dream: a step whose share
            ``int(masks * (1 - s/t))`` rounds to 0 unmasks nothing (and the last step unmasks everything left).
        temperature, top_p, top_k: Dream's filters and sampling (``temperature == 0``, the default: argmax).
        alg: Dream models: ``"origin"`` (default; each mask unmasks with probability ``1 - s/t``),
            ``"maskgit_plus"`` (most probable first), ``"topk_margin"`` (largest top-1 minus top-2 first),
            ``"entropy"`` (lowest entropy first).
        alg_temp: when > 0, the positions to unmask are sampled from ``softmax(confidence / alg_temp)``.
        eps: final time of ``timesteps = linspace(1, eps, steps + 1)`` (default 1e-3; per block).
        num_return_sequences: each prompt is decoded this many times (its rows repeated, as Dream's
            ``repeat_interleave``); the output has ``B * num_return_sequences`` rows, each with its own noise.
        remasking: LLaDA models: ``"low_confidence"`` (default; fp64 probability of the chosen token) or
            ``"random"``; sampling is LLaDA's Gumbel-max in fp64 at ``temperature``, and each block's masks are split
            evenly over its steps (the remainder to the first steps).
        cfg_scale: LLaDA models: classifier-free guidance (``0``: off); the unconditional pass sees the prompt as
            masks, and the logits are ``uncond + (cfg_scale + 1) * (cond - uncond)``.
        block_length: decode in blocks of this many positions, left to right (it must divide the decoded length;
            ``steps`` must be a multiple of the number of blocks). Default: one block.
        threshold: in ``(0, 1]``: each step unmasks every masked position of the block whose confidence reaches it,
            and the most confident one in any case (``steps`` then only sets the block count check).
        cache: ``"none"`` (default), ``"prefix"`` or ``"dual"``; ``use_cache=True`` means ``"prefix"`` and
            ``dual_cache=True`` means ``"dual"`` (Fast-dLLM's names).
        fast_dllm_compat: Dream models with a cache: Fast-dLLM's Dream loop, token for token (each block's first
            forward commits the block's first position; fixed-count steps rank by negative entropy whatever ``alg``
            says, threshold steps by ``p(x0)``).
        output_history, return_dict_in_generate: as in Dream; history needs both.
        generation_tokens_hook_func: ``f(step, x, logits) -> x``, called before the first step (``step=None``) and
            after each step's unmasking; it may edit the decoded region (from the first mask token of any prompt on).
        generation_logits_hook_func: ``f(step, x, logits) -> logits`` on the full logits ``[B, P + N, V]``, row i
            predicting position i.
            Either hook makes the loop compute logits for every position and run eagerly.
        soft_mask: a :class:`SoftMask`, a ``transparency_config`` dict or a path to one; the authors' keywords
            (``transparency_scale=..., mixinputs_k=...``) are accepted instead. ``None``: plain (binary) masks.
        mask_token_id: default ``model.config.mask_token_id``.
        pad_token_id, bos_token_id, eos_token_id: default from ``model.config``; read where Dream reads them: a
            prompt holding the pad id without an ``attention_mask`` gets Dream's warning; bos and eos (an id or a list
            of ids) are checked but, as in Dream's decoding loop, not used.
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
    if is_mdlm_model(model):  # MDLM's and ReMDM's samplers (sampler=, eta=, ... in the keywords)
        return generate_from_diffusion_api(
            model,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            steps=steps,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            alg=alg,
            alg_temp=alg_temp,
            eps=eps,
            output_history=output_history,
            return_dict_in_generate=return_dict_in_generate,
            generation_tokens_hook_func=generation_tokens_hook_func,
            generation_logits_hook_func=generation_logits_hook_func,
            soft_mask=soft_mask,
            mask_token_id=mask_token_id,
            generator=generator,
            seed=seed,
            cuda_graph=cuda_graph,
            **soft_mask_kwargs,
        )
    keywords = {name: value for name, value in locals().items() if name in GENERATION_FIELDS}
    unknown = sorted(k for k in soft_mask_kwargs if not k.startswith(_SOFT_MASK_PREFIXES))
    if unknown:
        raise TypeError(f"diffusion_generate() got unexpected keyword arguments {unknown}")
    config = model.config
    g = resolve_generation_config(generation_config, keywords, config)
    if g["mask_token_id"] is None:
        raise ValueError("the model's config has no mask_token_id; pass mask_token_id=")
    max_positions = getattr(config, "max_position_embeddings", None)
    prompt_len = input_ids.shape[-1] if isinstance(input_ids, Tensor) and input_ids.dim() == 2 else 0
    llada = "remasking" in family_of(model).default_decoding
    alg, eps = _family_keywords(
        llada,
        alg=g["alg"],
        eps=g["eps"],
        top_p=g["top_p"],
        top_k=g["top_k"],
        alg_temp=g["alg_temp"],
        remasking=remasking,
        cfg_scale=cfg_scale,
        fast_dllm_compat=fast_dllm_compat,
        hooks=generation_tokens_hook_func or generation_logits_hook_func,
    )
    options = DecodeOptions(
        max_new_tokens=new_token_count(g, prompt_len, max_positions),
        steps=1 if g["steps"] is None else g["steps"],  # None: one token per step, once the prompts' masks are counted
        mask_token_id=g["mask_token_id"],
        temperature=0.0 if g["temperature"] is None else g["temperature"],
        top_p=g["top_p"],
        top_k=g["top_k"],
        alg=alg,
        alg_temp=g["alg_temp"],
        eps=eps,
        block_length=block_length,
        threshold=threshold,
        cache=_cache_mode(cache, use_cache, dual_cache),
        cfg_scale=cfg_scale or 0.0,
        fast_dllm_compat=fast_dllm_compat,
    )
    device = model.get_input_embeddings().weight.device
    prompt = check_prompt(
        input_ids, attention_mask, options, vocab_size=config.vocab_size, max_positions=max_positions, device=device
    )
    _check_special_tokens(g, prompt, config.vocab_size)
    prompt = _repeat_rows(prompt, 1 if g["num_return_sequences"] is None else g["num_return_sequences"])
    if g["steps"] is None:
        options = dataclasses.replace(options, steps=prompt.most_masks)
    return_dict_in_generate, output_history = bool(g["return_dict_in_generate"]), bool(g["output_history"])
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


def _repeat_rows(prompt: Prompt, times: Any) -> Prompt:
    """Each prompt ``times`` times in a row, as Dream's ``num_return_sequences``."""
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise ValueError(f"num_return_sequences must be an int >= 1, got {times!r}")
    if times == 1:
        return prompt
    mask = prompt.attention_mask
    return dataclasses.replace(
        prompt,
        input_ids=prompt.input_ids.repeat_interleave(times, 0),
        attention_mask=None if mask is None else mask.repeat_interleave(times, 0),
    )


def _check_special_tokens(g: Mapping[str, Any], prompt: Prompt, vocab_size: int) -> None:
    """Dream's reads of the pad, bos and eos ids: each must be a token id (eos may be several); a prompt holding the
    pad id without an attention mask gets Dream's warning."""
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = g[name]
        ids = value if name == "eos_token_id" and isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids
        ):
            raise ValueError(
                f"{name} must be a token id in [0, {vocab_size})"
                f"{' or a list of them' if name == 'eos_token_id' else ''}, got {value!r}"
            )
    pad = g["pad_token_id"]
    if pad is not None and prompt.attention_mask is None and bool((prompt.input_ids == pad).any()):
        warnings.warn(
            "Padding was detected but no attention mask is passed here. For correct generation results, "
            "please set `attention_mask` when batch-padding inputs.",
            UserWarning,
            stacklevel=3,
        )


def _family_keywords(
    llada: bool,
    *,
    alg: str | None,
    eps: float | None,
    remasking: str | None,
    cfg_scale: float | None,
    fast_dllm_compat: bool,
    hooks: Any,
    **dream_only: Any,
) -> tuple[str, float]:
    """(alg, eps) for the model's family; keywords of the other family are errors, never ignored."""
    if llada:
        given = [
            name
            for name, value in (
                ("alg", alg),
                ("eps", eps),
                *dream_only.items(),
                ("fast_dllm_compat", fast_dllm_compat or None),
                ("generation hooks", hooks),
            )
            if value is not None
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)}: Dream's decoding keywords, not LLaDA's (use remasking=, cfg_scale=, temperature=)"
            )
        remasking = "low_confidence" if remasking is None else remasking
        if remasking not in REMASKING:
            raise ValueError(f"unknown remasking {remasking!r}; expected one of {REMASKING}")
        return remasking, 1e-3
    for name, value in (("remasking", remasking), ("cfg_scale", cfg_scale)):
        if value is not None:
            raise ValueError(
                f"{name} is a LLaDA decoding keyword; a Dream model takes alg= (and has no classifier-free guidance)"
            )
    if alg in REMASKING:
        raise ValueError(f"alg {alg!r} is LLaDA's remasking rule; a Dream model takes one of the Dream algs")
    return ("origin" if alg is None else alg), (1e-3 if eps is None else eps)


def _cache_mode(cache: str | None, use_cache: bool, dual_cache: bool) -> str:
    """The cache mode from ``cache=`` or Fast-dLLM's ``use_cache=`` / ``dual_cache=``; conflicts are errors."""
    for name, value in (("use_cache", use_cache), ("dual_cache", dual_cache)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    implied = "dual" if dual_cache else "prefix" if use_cache else None
    if cache is None:
        return implied or "none"
    if implied is not None and cache != implied:
        flag = "dual_cache=True" if dual_cache else "use_cache=True"
        raise ValueError(f"cache={cache!r} conflicts with {flag} (which means cache={implied!r}); pass one of them")
    return cache


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
