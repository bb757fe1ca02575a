"""Fine-tuning recipes: named presets of hyper-parameters, and the SM parameters a run starts from.

``python -m softmask_ext.finetune --preset NAME`` starts from ``{**FALLBACKS, **PRESETS[NAME]}`` and applies explicit
flags on top; experiments use the same dictionaries (never the CLI module).

* ``tiny``: the CPU demo on the shipped 1.4M-parameter model (about a minute on 2 idle cores). It starts the SM
  parameters exactly as the paper does (scale ~1e-6, steepness 6.66, centre -0.75) and differs from the Dream recipe
  where the model and the run are small: full fine-tuning at lr 1e-4 (3e-4 made the binary baseline worse than the
  base model), short sequences, and an SM learning rate of 0.3 instead of 1e-2. Adam moves a raw (logit) parameter
  by at most about lr per update and the scale must travel about 13 logit units from 1e-6 to an active blend; the
  paper's Dream runs make tens of thousands of updates, this one about 300 SM updates under a cosine schedule
  (measured on the shipped model: the README's fine-tuning results).
* ``dream-paper``: the authors' Dream recipe as their trainer and data collator run it: DoRA r=16, alpha=16, dropout 0
  on q/k/v/o, lr 1e-5 cosine with 3% warmup, grad-norm clip 7 on the summed loss, bf16, gradient checkpointing,
  batch 1 x accumulation 8, max length 2048, sm_prob 0.5, SM parameters at lr 1e-2 from the paper's initialisation,
  one epoch of at most 300k samples; per sequence ``t ~ U[0.2, 0.8]``, mask probability ``(1 - 1e-3) t + 1e-3``, loss
  ``(1/t) x`` the mean cross-entropy over its masked tokens, summed over the step (``loss="sequence"``); padding to
  the longest sequence plus 0-49 tokens (a multiple of 8) trained as response; only the last message is the
  response; responses under 5 tokens and samples with tool-call tokens dropped; validation every 100 steps on 500
  sequences, the best checkpoint kept.
* ``dream-tokens``: the same optimisation with this library's own data and loss conventions (the behaviour of
  ``dream-paper`` before it followed the authors' trainer): one ``t`` per micro-batch, mask probability ``t``, the
  ``1/t``-weighted cross-entropy normalised by all response tokens of the step (MDLM's per-token ELBO, so clipping
  acts on a per-token mean), no training on padding, every assistant turn a response, no filters.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from ..conventions import SHIPPED_MODEL, pad_or_eos
from ..data import TOOL_CALL_TOKEN_IDS
from ..diffusion.noise import NoiseSchedule
from ..soft_mask import SoftMask
from .gate_init import confidence_centre, masked_neg_entropy

__all__ = ["FALLBACKS", "PRESETS", "SHIPPED_MODEL", "drop_token_ids", "gate_centre", "initial_soft_mask"]

#: The tiny code model shipped with the package (the CPU demo's default).

_DREAM = dict(
    adapter="dora",
    rank=16,
    alpha=16.0,
    lora_dropout=0.0,
    lr=1e-5,
    sm_lr=1e-2,
    sm_init_scale=0.0,
    sm_init_centre=-0.75,
    warmup_ratio=0.03,
    clip=7.0,
    bf16=True,
    gradient_checkpointing=True,
    batch_size=1,
    grad_accum=8,
    max_length=2048,
    sm_prob=0.5,
    k=1,
    max_steps=None,
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        adapter="full",
        lr=1e-4,
        sm_lr=0.3,
        sm_init_scale=0.0,
        sm_init_centre=-0.75,
        warmup_ratio=0.03,
        clip=1.0,
        bf16=False,
        gradient_checkpointing=False,
        batch_size=8,
        grad_accum=1,
        max_length=128,
        sm_prob=0.5,
        k=1,
        max_steps=600,
        eval_batches=16,
    ),
    "dream-paper": dict(
        **_DREAM,
        loss="sequence",
        mask_eps=1e-3,
        pad_as_response=True,
        responses="last",
        min_response_tokens=5,
        drop_tool_calls=True,
        max_samples=300_000,
        eval_every=100,
        eval_batches=500,
    ),
    "dream-tokens": dict(**_DREAM, eval_batches=64),
}
FALLBACKS: dict[str, Any] = dict(
    sm_eps=1e-8,
    rank=16,
    alpha=16.0,
    lora_dropout=0.0,
    weight_decay=0.0,
    t_min=0.2,
    t_max=0.8,
    seed=0,
    save_every=None,
    save_minutes=30.0,
    eval_every=0,
    keep_checkpoints=2,
    val_fraction=0.02,
    loss="tokens",
    mask_eps=0.0,
    pad_as_response=False,
    responses="all",
    min_response_tokens=1,
    drop_tool_calls=False,
    max_samples=None,
)


def drop_token_ids(settings: dict[str, Any]) -> tuple[int, ...]:
    """The token ids whose samples a run drops (the tool-call tokens under ``drop_tool_calls``)."""
    return TOOL_CALL_TOKEN_IDS if settings["drop_tool_calls"] else ()


def gate_centre(text: str) -> float | str:
    """``--sm-init-centre``: ``auto`` or a negative number."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a negative number, got {text!r}") from None
    if not value < 0:
        raise argparse.ArgumentTypeError(f"the gate centre is a negative entropy and must be < 0, got {value}")
    return value


def initial_soft_mask(model: nn.Module, train: Any, settings: dict[str, Any], verbose: bool) -> SoftMask:
    """The SM parameters to start from; an ``auto`` centre is measured on the base model (rank-independent: every
    process sees the same first batches and noise)."""
    centre = settings["sm_init_centre"]
    if centre == "auto":
        neg_entropy = masked_neg_entropy(
            model,
            train,
            model.config.mask_token_id,
            pad_or_eos(model.config),
            NoiseSchedule(settings["t_min"], settings["t_max"]),
            batch_size=settings["batch_size"],
            seed=settings["seed"],
        )
        centre = confidence_centre(neg_entropy)
        if verbose:
            q10, q90 = neg_entropy.quantile(torch.tensor([0.1, 0.9])).tolist()
            print(
                f"soft-mask gate centre {centre:.3f}: the median confidence (negative entropy, nats) of the base "
                f"model at {neg_entropy.numel()} masked positions (10-90% range {q10:.2f} to {q90:.2f})"
            )
    return SoftMask(k=settings["k"], scale=settings["sm_init_scale"], centre=centre)
