"""Metrics of the language-modelling system: validation perplexity from the MDLM ELBO, generative perplexity of
samples under a causal LM, and MAUVE against held-out text.

- :func:`elbo_perplexity`: ``exp`` of the MDLM negative ELBO per token (log-linear noise, antithetic times with a
  fixed seed, ``-log p / t`` over masked tokens divided by all tokens); with an SM module the two-pass SM forward
  is evaluated, as the paper does for its SM models. Callers evaluate EMA weights (the trainer does).
- :func:`generative_perplexity`: samples decoded to text, re-tokenised by the scorer's tokenizer, scored by
  ``transformers.AutoModelForCausalLM`` loaded from a local directory (the paper uses GPT-2 Large); the mean NLL of
  every token after the first, counting tokens up to and including the first end-of-text.
- :func:`mauve_score`: MAUVE (``mauve-text``) between samples and held-out text, with a local feature model; when
  the package is not importable the result says it was skipped and why.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Example
from ..diffusion.mdlm_objective import antithetic_times, mask_tokens, mdlm_loss
from ..diffusion.noise import stream_generator
from ..diffusion.two_pass import DiffusionTrainingForward
from ..model.family import family_of
from ..soft_mask import SoftMask

__all__ = ["MAUVE_MISSING", "elbo_perplexity", "generative_perplexity", "mauve_score"]

_ELBO_STREAM = 0x4D444C4D
MAUVE_MISSING = "skipped: the mauve-text package is not installed (pip install mauve-text)"


def _perplexity(nll: float) -> float:
    return math.exp(nll) if nll < 700 else math.inf


@torch.no_grad()
def elbo_perplexity(
    model: nn.Module,
    blocks: Sequence[Example],
    soft_mask: SoftMask | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    seed: int = 0,
    num_samples: int = 1,
    forward: DiffusionTrainingForward | None = None,
) -> dict[str, float]:
    """Negative ELBO per token (``nll``, nats) and ``perplexity`` = ``exp(nll)`` over fixed-length ``blocks``.

    Every (batch, draw) has its own noise seeded by ``(seed, batch, draw)``, so two models evaluated with the same
    seed see identical noise and their difference is paired. ``forward`` runs ``model`` with ``soft_mask`` (default:
    one built here); a trainer passes its own, which under FSDP is the sharded root every process must run.
    """
    if batch_size < 1 or num_samples < 1:
        raise ValueError(f"batch_size and num_samples must be >= 1, got {batch_size} and {num_samples}")
    mask_token_id = model.config.mask_token_id
    if forward is None:
        forward = DiffusionTrainingForward(model, soft_mask, mask_token_id)
    forward.eval()
    logit_shift = family_of(model).logit_shift
    device = model.get_input_embeddings().weight.device
    total, tokens = 0.0, 0
    starts = range(0, len(blocks), batch_size)
    for b, start in enumerate(starts if max_batches is None else list(starts)[:max_batches]):
        x0 = torch.stack([e.input_ids for e in blocks[start : start + batch_size]]).to(device)
        for r in range(num_samples):
            generator = stream_generator(seed, _ELBO_STREAM, b * num_samples + r)
            t = antithetic_times(x0.shape[0], generator)
            x_t = mask_tokens(x0, t, mask_token_id, generator)
            loss = mdlm_loss(forward(x_t, None, soft_mask is not None), x0, t, x_t, mask_token_id, logit_shift)
            total += float(loss) / num_samples
        tokens += x0.numel()
    if tokens == 0:
        raise ValueError("no validation blocks to evaluate")
    nll = total / tokens
    return {"nll": nll, "perplexity": _perplexity(nll), "tokens": tokens}


@torch.no_grad()
def generative_perplexity(
    texts: Sequence[str],
    scorer: str | os.PathLike,
    batch_size: int = 8,
    max_length: int = 1024,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Perplexity of ``texts`` under the causal LM in the local directory ``scorer``.

    Each text is tokenised by the scorer's tokenizer (truncated to ``max_length``); tokens after the first are
    scored; padding and everything after the first end-of-text are not counted (MDLM's rule).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scorer = os.fspath(scorer)
    if not os.path.isdir(scorer):
        raise FileNotFoundError(f"scorer {scorer!r} is not a local checkpoint directory")
    if not texts:
        raise ValueError("no texts to score")
    tokenizer = AutoTokenizer.from_pretrained(scorer, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(scorer, local_files_only=True).to(device).eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        encoded = [
            tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            for text in texts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), pad if pad is not None else 0, dtype=torch.long)
        real = torch.zeros(len(encoded), width, dtype=torch.bool)
        for row, seq in enumerate(encoded):
            ids[row, : len(seq)], real[row, : len(seq)] = torch.tensor(seq, dtype=torch.long), True
        ids, real = ids.to(device), real.to(device)
        logits = lm(input_ids=ids, attention_mask=real.long()).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        counted = real[:, 1:]
        if eos is not None:
            # up to and including the first end-of-text of each row
            seen = (ids == eos).long().cumsum(-1)
            counted = counted & ((seen[:, 1:] == 0) | ((seen[:, 1:] == 1) & (ids[:, 1:] == eos)))
        total += float((nll * counted).sum())
        count += int(counted.sum())
    if count == 0:
        raise ValueError("the texts hold no token to score (each needs at least two)")
    nll = total / count
    return {"nll": nll, "perplexity": _perplexity(nll), "tokens": count}


def mauve_score(
    samples: Sequence[str],
    references: Sequence[str],
    feature_model: str | os.PathLike | None = None,
    device_id: int = -1,
    max_length: int = 1024,
    seed: int = 0,
) -> dict[str, Any]:
    """MAUVE between ``samples`` and held-out ``references`` (``mauve-text``), featurised by the causal LM in the
    local directory ``feature_model`` (the paper uses GPT-2 Large). Without ``mauve-text``: ``{"skipped": ...}``."""
    try:
        import mauve
    except ImportError:
        return {"skipped": MAUVE_MISSING}
    if feature_model is None or not os.path.isdir(os.fspath(feature_model)):
        return {"skipped": f"MAUVE needs a local feature model directory (got {feature_model!r})"}
    result = mauve.compute_mauve(
        p_text=list(samples),
        q_text=list(references),
        featurize_model_name=os.fspath(feature_model),
        device_id=device_id,
        max_text_length=max_length,
        seed=seed,
        verbose=False,
    )
    return {"mauve": float(result.mauve)}
