"""Soft-masked diffusion decoding: Dream's algorithm on a CUDA-graph-ready engine.

- :func:`diffusion_generate` -- the user-facing call (Dream's parameters, plus ``soft_mask``);
- :class:`DiffusionDecoder` -- the engine (static buffers, the step, graph capture), reusable across runs of one shape;
- :mod:`.schedule`, :mod:`.sampling`, :mod:`.options` -- the host-side schedule, the sync-free sampling, the checks.
"""

from .api import DecodeResult, diffusion_generate
from .engine import DiffusionDecoder
from .options import DecodeOptions, Prompt, check_prompt
from .sampling import ALGS

__all__ = ["ALGS", "DecodeOptions", "DecodeResult", "DiffusionDecoder", "Prompt", "check_prompt", "diffusion_generate"]
