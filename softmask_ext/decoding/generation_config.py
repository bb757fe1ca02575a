"""Dream's ``generation_config``: its fields, how keywords override them, and how ``max_length`` becomes a length.

``diffusion_generate`` takes Dream's settings as keywords, from a ``generation_config`` (Dream's
``DreamGenerationConfig``, a transformers ``GenerationConfig`` or any object with these attributes, or a dict), or
both: a keyword that is not ``None`` wins over the config, as Dream's ``generation_config.update(**kwargs)`` does.
The special token ids a config leaves unset come from the model's config, as in Dream.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

__all__ = ["DREAM_DEFAULT_MAX_LENGTH", "GENERATION_FIELDS", "new_token_count", "resolve_generation_config"]

#: The fields of Dream's ``DreamGenerationConfig`` that decoding reads.
GENERATION_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "max_length",
    "max_new_tokens",
    "eps",
    "steps",
    "alg",
    "alg_temp",
    "num_return_sequences",
    "return_dict_in_generate",
    "output_history",
    "mask_token_id",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
_TOKEN_FIELDS = ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id")

#: transformers' model-agnostic default ``max_length``; Dream reads it, when it was not passed as a keyword, as
#: "this many new tokens" (capped at the model's positions), not as a total length.
DREAM_DEFAULT_MAX_LENGTH = 20


def resolve_generation_config(generation_config: Any, keywords: Mapping[str, Any], model_config: Any) -> dict[str, Any]:
    """Every field of :data:`GENERATION_FIELDS`: the keyword when not ``None``, else the config's value, else (token
    ids) the model config's, else ``None``. Also ``max_length_keyword``: whether ``max_length`` came as a keyword."""
    if generation_config is None:
        config: Mapping[str, Any] = {}
    elif isinstance(generation_config, Mapping):
        unknown = sorted(set(generation_config) - set(GENERATION_FIELDS))
        if unknown:
            raise ValueError(f"generation_config has unknown keys {unknown}; known: {list(GENERATION_FIELDS)}")
        config = generation_config
    else:
        config = {name: getattr(generation_config, name, None) for name in GENERATION_FIELDS}
    settings = {
        name: keywords[name] if keywords.get(name) is not None else config.get(name) for name in GENERATION_FIELDS
    }
    for name in _TOKEN_FIELDS:
        if settings[name] is None:
            settings[name] = getattr(model_config, name, None)
    settings["max_length_keyword"] = keywords.get("max_length") is not None
    return settings


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def new_token_count(settings: Mapping[str, Any], prompt_len: int, max_positions: int | None) -> int:
    """``N``, the tokens to generate after the prompt, from ``max_new_tokens`` or ``max_length`` as Dream reads them.

    ``max_new_tokens`` wins over ``max_length`` (a warning when both came as keywords and disagree). ``max_length`` is
    the total length, prompt included, so ``N = max_length - P``; Dream's default 20, when not passed as a keyword,
    means 20 new tokens capped at the model's positions (with Dream's warning when nothing set the length at all).
    """
    max_new, max_length = settings["max_new_tokens"], settings["max_length"]
    if max_new is not None:
        max_new = _check_count("max_new_tokens", max_new)
        if settings["max_length_keyword"] and max_length != prompt_len + max_new:
            warnings.warn(
                f"both max_new_tokens ({max_new}) and max_length ({max_length}) were given; "
                "max_new_tokens takes precedence, as in Dream",
                UserWarning,
                stacklevel=3,
            )
        return max_new
    if max_length is None or (max_length == DREAM_DEFAULT_MAX_LENGTH and not settings["max_length_keyword"]):
        if max_length is None:
            warnings.warn(
                f"neither max_new_tokens nor max_length was given: generating Dream's default of "
                f"{DREAM_DEFAULT_MAX_LENGTH} new tokens",
                UserWarning,
                stacklevel=3,
            )
        total = min(prompt_len + DREAM_DEFAULT_MAX_LENGTH, max_positions if max_positions is not None else math.inf)
        return max(int(total) - prompt_len, 0)  # a prompt filling the model's positions is reported by the prompt check
    max_length = _check_count("max_length", max_length)
    if max_length < prompt_len:
        raise ValueError(
            f"max_length ({max_length}) is the total length, prompt included, and must be at least the "
            f"prompt length {prompt_len}"
        )
    return max_length - prompt_len
