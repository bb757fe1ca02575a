"""Command-line flags of block-wise decoding, shared by the ``generate`` and ``evaluate`` CLIs."""

from __future__ import annotations

import argparse
from typing import Any

from torch import nn

from ..model.family import family_of
from .options import CACHE_MODES

__all__ = ["add_fast_decoding_flags", "dream_keywords", "fast_decoding_kwargs"]


def add_fast_decoding_flags(parser: argparse.ArgumentParser, threshold_sweep: bool = False) -> None:
    """``--block-length``, ``--cache`` and ``--threshold`` (see ``diffusion_generate``); with ``threshold_sweep``
    the threshold takes comma-separated values."""
    parser.add_argument(
        "--block-length", type=int, help="decode in blocks of this many tokens, left to right (default: one block)"
    )
    parser.add_argument(
        "--cache",
        choices=CACHE_MODES,
        default="none",
        help="K/V cache across each block's steps: prefix (before the block) or dual (before and after); approximate",
    )
    parser.add_argument(
        "--threshold",
        type=_thresholds if threshold_sweep else float,
        help="parallel decoding: unmask every position of the block whose confidence reaches this, "
        "in (0, 1]" + (" (comma-separated: a sweep)" if threshold_sweep else ""),
    )


def _thresholds(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def fast_decoding_kwargs(args: argparse.Namespace, threshold: bool = True) -> dict[str, Any]:
    """The ``diffusion_generate`` keywords of those flags (without the threshold when ``threshold`` is False)."""
    kwargs = {"block_length": args.block_length, "cache": args.cache}
    return {**kwargs, "threshold": args.threshold} if threshold else kwargs


def dream_keywords(model: nn.Module, **kwargs: Any) -> dict[str, Any]:
    """The CLIs' Dream-only decoding flags (``--alg``, ``--top-p``, ...) for a Dream-style model; nothing for a
    LLaDA-style one, which decodes with its own remasking rule (``diffusion_generate`` rejects Dream's keywords)."""
    return {} if "remasking" in family_of(model).default_decoding else kwargs
