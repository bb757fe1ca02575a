"""Soft-masked diffusion decoding: Dream's and LLaDA's algorithms, block-wise with K/V caches and threshold parallel
decoding, on a CUDA-graph-ready engine.

- :func:`diffusion_generate` -- the user-facing call (Dream's parameters, plus ``soft_mask``);
- :class:`DiffusionDecoder` -- the engine (static buffers, the step, graph capture), reusable across runs of one shape;
- :mod:`.schedule`, :mod:`.sampling`, :mod:`.options` -- the host-side schedule, the sync-free sampling, the checks.
"""

from .api import DecodeResult, diffusion_generate
from .cli import add_fast_decoding_flags, dream_keywords, fast_decoding_kwargs
from .engine import SM_INPUTS_RANGE, DiffusionDecoder
from .options import CACHE_MODES, DecodeOptions, Prompt, check_prompt
from .sampling import ALGS, REMASKING

__all__ = [
    "ALGS",
    "CACHE_MODES",
    "REMASKING",
    "SM_INPUTS_RANGE",
    "DecodeOptions",
    "DecodeResult",
    "DiffusionDecoder",
    "Prompt",
    "add_fast_decoding_flags",
    "check_prompt",
    "diffusion_generate",
    "dream_keywords",
    "fast_decoding_kwargs",
]
