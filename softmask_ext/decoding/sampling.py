"""Token proposals, confidences and the choice of positions to unmask, on fixed shapes and without host syncs
(except the CPU's eager top-p, which sorts only the rows that need it; see :func:`_top_p_filter`).

Semantics are those of Dream's reference decoding (filters, ``sample_tokens``, the four algorithms); randomness
comes from noise buffers filled before each step (:class:`StepNoise`), so a step is a pure function of its inputs
and can be captured in a CUDA graph:

- categorical sampling inverts the CDF: with one uniform ``u`` per row, the first token whose cumulative probability
  (summed in fp64) exceeds ``u`` times the total, which draws from ``p`` with one random number per row;
- ``alg_temp`` sampling of ``k`` positions without replacement from ``softmax(conf / alg_temp)`` is Gumbel-top-k,
  ``topk(conf / alg_temp + G)`` with ``G = -log E``;
- ``origin`` unmasks each still-masked position when its uniform draw is below ``1 - s/t``.

LLaDA's remasking rules (:data:`REMASKING`) come with LLaDA's sampler: Gumbel-max in fp64 over the whole vocabulary,
``argmax(exp(z) / (-log u) ** temperature)`` with one uniform ``u`` per logit (the same formula, so the same token for
the same noise), and ``low_confidence`` ranks by the fp64 softmax probability of the chosen token; ``random`` ranks by
a uniform draw per position.

With a ``threshold``, every masked position whose confidence reaches it is unmasked, and the most confident one in
any case (Fast-dLLM's parallel decoding); the count is then data-dependent but the shapes are not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ALGS", "REMASKING", "StepNoise", "filter_logits", "propose", "select_transfers"]

# Dream's algorithms, and LLaDA's remasking rules (which also choose LLaDA's sampler and per-step counts).
ALGS: tuple[str, ...] = ("origin", "maskgit_plus", "topk_margin", "entropy")
REMASKING: tuple[str, ...] = ("low_confidence", "random")

# Dream's entropy confidence adds this inside the log.
_LOG_EPS = 1e-10

# Top-p looks for the nucleus among this many largest logits first (a partial selection instead of a sort).
TOP_P_CANDIDATES = 64


def _nucleus_floor(descending: Tensor, total: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """The smallest logit top-p keeps, from the ``K`` largest logits of each row.

    Args:
        descending: fp32 ``[R, K]``, each row's ``K`` largest logits in descending order.
        total: fp32 ``[R, 1]``, each row's ``sum(exp(z - max))`` over its whole vocabulary (the softmax's
            denominator: shares taken relative to the maximum, as Dream's softmax does, stay exact to fp32 however
            large the logits, where ``exp(z - logsumexp)`` would carry logsumexp's rounding into every share).

    Returns:
        ``floor`` fp32 ``[R, 1]`` and ``decided`` bool ``[R, 1]``. A token is kept when the tokens ranked above it
        hold at most ``top_p`` of the probability (Dream's rule; the first token always stays). The kept ranks are a
        prefix; ``floor`` is the logit of the last one, and tokens tied with it are kept too. ``decided``: the prefix
        ends inside the ``K`` (some candidate is dropped), so ``floor`` holds for the whole row.
    """
    mass = (descending - descending[:, :1]).exp() / total
    above = F.pad(mass.cumsum(-1)[:, :-1], (1, 0))
    kept = above <= top_p
    floor = descending.gather(-1, kept.sum(-1, keepdim=True) - 1)
    return floor, ~kept[:, -1:]


def _top_p_filter(z: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``; the rest get fp32's min.

    On CUDA, whenever the step is being compiled, and for vocabularies of at most :data:`TOP_P_CANDIDATES`, every
    row is sorted (a radix sort on the GPU; no host sync and no data-dependent shape, so the step stays capturable).
    Otherwise (the CPU, eagerly), where sorting a 152k vocabulary costs ~10 ms per row, the nucleus is sought among
    the :data:`TOP_P_CANDIDATES` largest logits, and only the rows whose nucleus reaches beyond them are sorted (which
    takes a host sync). Both give the same result.
    """
    rows = z.reshape(-1, z.shape[-1])
    sort_all = rows.is_cuda or torch.compiler.is_compiling() or rows.shape[-1] <= TOP_P_CANDIDATES
    if sort_all:
        descending = torch.sort(rows, dim=-1, descending=True).values
    else:
        descending = torch.topk(rows, TOP_P_CANDIDATES, dim=-1).values
    total = (rows - descending[:, :1]).exp().sum(-1, keepdim=True)  # the first column is the row's maximum
    floor, decided = _nucleus_floor(descending, total, top_p)
    if not sort_all:
        wide = (~decided).squeeze(-1).nonzero().squeeze(-1)
        if wide.numel():
            descending = torch.sort(rows.index_select(0, wide), dim=-1, descending=True).values
            floor[wide] = _nucleus_floor(descending, total.index_select(0, wide), top_p)[0]
    return z.masked_fill(z < floor.view(*z.shape[:-1], 1), torch.finfo(z.dtype).min)


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


def _inverse_cdf(probs: Tensor, uniform: Tensor) -> Tensor:
    """One draw from each row of ``probs`` (fp32 ``[..., V]``, unnormalised is fine) given ``uniform`` (fp64 ``[...]``
    in ``[0, 1)``): the first token whose cumulative probability exceeds ``uniform`` times the row's total.

    The sums are fp64, so every token's share is exact to ~1e-16 of the total (an fp32 running sum over 152k tokens
    would swallow tokens below ~3e-8 once it nears 1), and a token of probability 0 is never drawn. A NaN row gives
    an unspecified token in range.
    """
    cdf = probs.cumsum(-1, dtype=torch.float64)
    target = uniform.unsqueeze(-1) * cdf[..., -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max_(probs.shape[-1] - 1)


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
        logits: ``[..., V]`` logits of the positions to decide (any float dtype; processed in fp32, fp64 for
            :data:`REMASKING`).
        token_noise: required when ``temperature > 0``, ignored otherwise: fp64 ``[...]`` uniform draws in
            ``[0, 1)``, one per row, for Dream's algorithms; fp64 ``[..., V]``, one per logit, for LLaDA's
            Gumbel-max (:data:`REMASKING`).

    Returns:
        ``tokens`` int64 ``[...]`` (argmax at temperature 0, a sample otherwise) and ``confidence`` ``[...]``:
        fp32 ``p(token)`` for ``maskgit_plus``, ``p1 - p2`` for ``topk_margin``, ``sum p log(p + 1e-10)`` for
        ``entropy`` (all from the filtered distribution); fp64 ``p(token)`` at temperature 1 for
        ``low_confidence``; ``None`` for ``origin`` and ``random`` (ranked by noise).
    """
    if alg in REMASKING:
        return _propose_llada(logits, alg=alg, temperature=temperature, gumbel_uniform=token_noise)
    probs = torch.softmax(filter_logits(logits, temperature, top_p, top_k), dim=-1, dtype=torch.float32)
    if temperature > 0:
        tokens = _inverse_cdf(probs, token_noise)
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


def _propose_llada(
    logits: Tensor, *, alg: str, temperature: float, gumbel_uniform: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """LLaDA's ``add_gumbel_noise`` + argmax, and its ``low_confidence`` score (fp64 throughout)."""
    if temperature > 0:
        tokens = (logits.double().exp() / (-torch.log(gumbel_uniform)) ** temperature).argmax(-1)
    else:
        tokens = logits.argmax(-1)
    if alg == "random":
        return tokens, None
    probs = torch.softmax(logits.double(), dim=-1)
    return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def select_transfers(
    masked: Tensor,
    *,
    alg: str,
    confidence: Tensor | None,
    ratio: Tensor | None,
    alg_temp: float | None,
    select_noise: Tensor | None,
    count: Tensor | None = None,
    threshold: float | None = None,
) -> Tensor:
    """Which positions to unmask this step, bool ``[B, L]`` (``L``: the positions decided, a region or a block).

    Args:
        masked: bool ``[B, L]``, positions still masked before the step.
        confidence: ``[B, L]`` (confidence-ranked algorithms).
        ratio: fp32 ``[1]``, this step's ``1 - s/t`` (1 on the last step); unused when ``count`` is given.
        select_noise: fp32 ``[B, L]``: uniform draws for ``origin`` and ``random`` (the latter's confidence),
            Gumbel draws when ``alg_temp`` > 0.
        count: int64 ``[B, 1]``, how many to unmask per row (LLaDA's precomputed counts), instead of ``ratio``.
        threshold: unmask every masked position whose confidence is at least ``threshold``, and the most
            confident one in any case (``count`` and ``ratio`` unused).

    ``origin`` unmasks each masked position with probability ``ratio``. The other algorithms unmask, in each row,
    Dream's ``int(n_mask * ratio)`` most confident positions (float32 product, as the reference); ties in confidence
    go to the earlier position. ``n_mask`` is the row's own mask count, where Dream takes the batch mean: the two
    agree whenever rows hold equally many masks, which is the case unless prompts hold different numbers of mask
    tokens, the model predicts the mask token itself, or a hook edits rows unequally; per-row counts keep a prompt's
    tokens independent of its batch.
    """
    if alg == "origin":
        return masked & (select_noise < ratio)
    if alg == "random":
        confidence = select_noise
    if threshold is not None:
        # Rank 0 (the most confident masked position) always goes; no rank is needed beyond it.
        score = confidence.masked_fill(~masked, float("-inf"))
        first = score.argmax(-1, keepdim=True)
        best = torch.zeros_like(masked).scatter_(-1, first, True)
        return masked & (best | (confidence >= threshold))
    if count is None:
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

    Draw order per step (tests replay it): ``token`` (fp64 uniform, ``[B, L]``; ``[B, L, V]`` for LLaDA's
    Gumbel-max) when ``temperature > 0``, then ``select``: uniform ``[B, L]`` for ``origin`` and ``random``,
    ``-log Exp(1)`` (Gumbel) ``[B, L]`` when ``alg_temp`` > 0.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        alg: str,
        temperature: float,
        alg_temp: float | None,
        device: torch.device,
        generator: torch.Generator | None,
        vocab_size: int | None = None,
    ) -> None:
        self.generator = generator
        token_shape = (*shape, vocab_size) if alg in REMASKING else shape
        self.token = torch.empty(*token_shape, dtype=torch.float64, device=device) if temperature > 0 else None
        self.select_uniform = alg in ("origin", "random")
        self.select = torch.empty(*shape, device=device) if self.select_uniform or alg_temp else None

    def draw(self) -> None:
        if self.token is not None:
            self.token.uniform_(generator=self.generator)
        if self.select is not None:
            if self.select_uniform:
                self.select.uniform_(generator=self.generator)
            else:
                self.select.exponential_(generator=self.generator).log_().neg_()
