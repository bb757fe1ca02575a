"""Token proposals, confidences and the choice of positions to unmask, on fixed shapes and without host syncs.

Semantics are those of Dream's reference decoding (filters, ``sample_tokens``, the four algorithms); randomness
comes from noise buffers filled before each step (:class:`StepNoise`), so a step is a pure function of its inputs
and can be captured in a CUDA graph:

- categorical sampling is an exponential race, ``argmax(p / E)`` with ``E ~ Exp(1)``, which draws from ``p``;
- ``alg_temp`` sampling of ``k`` positions without replacement from ``softmax(conf / alg_temp)`` is Gumbel-top-k,
  ``topk(conf / alg_temp + G)`` with ``G = -log E``;
- ``origin`` unmasks each still-masked position when its uniform draw is below ``1 - s/t``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ALGS", "StepNoise", "filter_logits", "propose", "select_transfers"]

ALGS: tuple[str, ...] = ("origin", "maskgit_plus", "topk_margin", "entropy")

# Dream's entropy confidence adds this inside the log.
_LOG_EPS = 1e-10


def _top_p_filter(z: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (always the most likely one)."""
    sorted_z, order = torch.sort(z, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_z, dim=-1).cumsum(dim=-1)
    # A token is dropped when the tokens ranked above it already reach top_p.
    drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
    drop_sorted[..., 1:] = cumulative[..., :-1] > top_p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return z.masked_fill(drop, torch.finfo(z.dtype).min)


def _top_k_filter(z: Tensor, top_k: int) -> Tensor:
    kth = torch.topk(z, min(top_k, z.shape[-1]), dim=-1).values[..., -1:]
    return z.masked_fill(z < kth, torch.finfo(z.dtype).min)


def filter_logits(logits: Tensor, temperature: float, top_p: float | None, top_k: int | None) -> Tensor:
    """Dream's filters in its order: ``logits / temperature`` (when > 0), top-p (when < 1), top-k; fp32 out.

    Without any filter the logits come back as they are (no fp32 copy): the softmax upcasts while it reads them.
    """
    if temperature <= 0 and (top_p is None or top_p >= 1) and top_k is None:
        return logits
    z = logits.float()
    if temperature > 0:
        z = z / temperature
    if top_p is not None and top_p < 1:
        z = _top_p_filter(z, top_p)
    if top_k is not None:
        z = _top_k_filter(z, top_k)
    return z


def propose(
    logits: Tensor,
    *,
    alg: str,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    token_noise: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """A token and its confidence for every logits row.

    Args:
        logits: ``[..., V]`` logits of the positions to decide (any float dtype; processed in fp32).
        token_noise: fp32 ``[..., V]`` ``Exp(1)`` draws, required when ``temperature > 0``, ignored otherwise.

    Returns:
        ``tokens`` int64 ``[...]`` (argmax at temperature 0, a sample otherwise) and ``confidence`` fp32 ``[...]``:
        ``p(token)`` for ``maskgit_plus``, ``p1 - p2`` for ``topk_margin``, ``sum p log(p + 1e-10)`` for
        ``entropy`` (all from the filtered distribution), ``None`` for ``origin``.
    """
    probs = torch.softmax(filter_logits(logits, temperature, top_p, top_k), dim=-1, dtype=torch.float32)
    if temperature > 0:
        tokens = torch.argmax(probs / token_noise, dim=-1)
        top1 = None
    else:
        top1, tokens = probs.max(dim=-1)
    if alg == "origin":
        return tokens, None
    if alg == "maskgit_plus":
        conf = top1 if top1 is not None else probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    elif alg == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        conf = top2[..., 0] - top2[..., 1]
    else:
        # Dream's sum p log(p + 1e-10), with one temporary instead of three (same values bit for bit).
        conf = probs.add(_LOG_EPS).log_().mul_(probs).sum(dim=-1)
    return tokens, conf


def select_transfers(
    masked: Tensor,
    *,
    alg: str,
    confidence: Tensor | None,
    ratio: Tensor,
    alg_temp: float | None,
    select_noise: Tensor | None,
) -> Tensor:
    """Which positions to unmask this step, bool ``[B, N]``.

    Args:
        masked: bool ``[B, N]``, positions still masked before the step.
        confidence: fp32 ``[B, N]`` (confidence-ranked algorithms).
        ratio: fp32 ``[1]``, this step's ``1 - s/t`` (1 on the last step).
        select_noise: fp32 ``[B, N]``: uniform draws for ``origin``, Gumbel draws when ``alg_temp`` > 0.

    ``origin`` unmasks each masked position with probability ``ratio``. The other algorithms unmask, in each row,
    Dream's ``int(n_mask * ratio)`` most confident positions (float32 product, as the reference); ties in confidence
    go to the earlier position. ``n_mask`` is the row's own mask count, where Dream takes the batch mean: the two
    agree whenever rows hold equally many masks, which is always the case unless the model predicts the mask token
    itself (or a hook edits rows unequally); per-row counts keep a prompt's tokens independent of its batch.
    """
    if alg == "origin":
        return masked & (select_noise < ratio)
    count = (masked.sum(-1, keepdim=True, dtype=torch.float32) * ratio).long()
    score = confidence
    if alg_temp:
        score = score / alg_temp + select_noise
    score = score.masked_fill(~masked, float("-inf"))
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    positions = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return masked & (rank < count)


class StepNoise:
    """Noise buffers of one decoding run, refilled from ``generator`` before every step.

    Draw order per step (tests replay it): ``token`` (``Exp(1)``, ``[B, N, V]``) when ``temperature > 0``, then
    ``select``: uniform ``[B, N]`` for ``origin``, ``-log Exp(1)`` (Gumbel) ``[B, N]`` when ``alg_temp`` > 0.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        vocab: int,
        *,
        alg: str,
        temperature: float,
        alg_temp: float | None,
        device: torch.device,
        generator: torch.Generator | None,
    ) -> None:
        self.generator = generator
        self.token = torch.empty(*shape, vocab, device=device) if temperature > 0 else None
        self.uniform = alg == "origin"
        self.select = torch.empty(*shape, device=device) if self.uniform or alg_temp else None

    def draw(self) -> None:
        if self.token is not None:
            # A zero draw would turn p / E into 0 / 0 for filtered-out tokens.
            self.token.exponential_(generator=self.generator).clamp_min_(torch.finfo(torch.float32).tiny)
        if self.select is not None:
            if self.uniform:
                self.select.uniform_(generator=self.generator)
            else:
                self.select.exponential_(generator=self.generator).log_().neg_()
