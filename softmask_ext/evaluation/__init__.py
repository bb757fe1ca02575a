"""Evaluation of masked diffusion models: ELBO perplexity bound, code infilling, HumanEval (with its sandbox).

The command line is :mod:`softmask_ext.evaluate`; the pieces live here:

- :mod:`.elbo` -- Monte Carlo estimate of the negative ELBO per token with a 95% interval;
- :mod:`.infill` -- held-out functions with hidden spans, decoded at several tokens per step;
- :mod:`.humaneval` -- HumanEval generation, execution and pass@k;
- :mod:`.sandbox` -- confined execution of untrusted programs;
- :mod:`.generation` -- batched, left-padded calls of the decoding engine.
"""

from .elbo import ElboResult, estimate_elbo, paired_difference
from .humaneval import Problem, evaluate_humaneval, load_problems, pass_at_k, run_tests
from .infill import InfillExample, evaluate_infill, make_infill_examples, plot_infill, score_infill
from .sandbox import Limits, SandboxResult, run_python

__all__ = [
    "ElboResult",
    "estimate_elbo",
    "paired_difference",
    "Problem",
    "evaluate_humaneval",
    "load_problems",
    "pass_at_k",
    "run_tests",
    "InfillExample",
    "evaluate_infill",
    "make_infill_examples",
    "plot_infill",
    "score_infill",
    "Limits",
    "SandboxResult",
    "run_python",
]
