"""Baselines for decode_bench.py: Dream's reference decoding loop and the authors' dense soft-masking, as they run.

A faithful, batched transcription of the public code paths (nothing here is used by the library):

- Dream's ``_sample``: a full forward pass with logits for every position each step, the shift, boolean indexing of
  the masked rows, ``sample_tokens`` on them, host-side ``int(...)`` of the unmask count, ``torch.topk`` over the
  whole row, no graphs;
- the authors' soft-masking on top of it: the full softmax and negative entropy of every position's logits, the
  top-k, a dense ``[B*T, V]`` mixture multiplied by the ``[V, D]`` embedding table, every step.
"""

from __future__ import annotations

import time

import torch
import torch.distributions as dists
import torch.nn.functional as F

from softmask_ext.reference import dense_soft_embeddings, neg_entropy


def _top_p_logits(logits, top_p):
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = 0
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_indices, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _top_k_logits(logits, top_k):
    top_k = min(top_k, logits.size(-1))
    return logits.masked_fill(logits < torch.topk(logits, top_k)[0][..., -1, None], torch.finfo(logits.dtype).min)


def _sample_tokens(logits, temperature, top_p, top_k, margin_confidence=False, neg_entropy_confidence=False):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p_logits(logits, top_p)
    if top_k is not None:
        logits = _top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = dists.Categorical(probs=probs).sample()
        confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy_confidence:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def authors_soft_embeddings(model, x, logits, soft_mask, mask_token_id, length):
    """The authors' SM inputs: dense mixture for every position, kept where the position is still masked."""
    weight = model.get_input_embeddings().weight
    batch, total, vocab = logits.shape
    is_mask = x == mask_token_id
    progress = is_mask[:, -length:].sum(-1, keepdim=True).float() / length
    lam = soft_mask.lam(neg_entropy(logits), progress) * is_mask
    soft = dense_soft_embeddings(logits.reshape(-1, vocab), weight, mask_token_id, lam.reshape(-1), soft_mask.k)
    return torch.where(is_mask[..., None], soft.view(batch, total, -1), weight[x])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def reference_generate(
    model,
    input_ids,
    *,
    max_new_tokens,
    steps,
    mask_token_id,
    temperature=0.0,
    top_p=None,
    top_k=None,
    alg="entropy",
    alg_temp=None,
    eps=1e-3,
    soft_mask=None,
    sm_timer=None,
):
    """Dream's decoding of unpadded prompts ``[B, P]`` (with the authors' SM when ``soft_mask`` is given).

    ``sm_timer``, a list, receives the seconds spent building SM inputs at each step (with device syncs).
    """
    x = F.pad(input_ids, (0, max_new_tokens), value=mask_token_id)
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
    embeds = None
    for i in range(steps):
        mask_index = x == mask_token_id
        if embeds is None:
            logits = model(input_ids=x).logits
        else:
            logits = model(inputs_embeds=embeds).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index], dtype=torch.long) + mask_token_id
            transfer = torch.rand(*x0.shape, device=x.device) < p_transfer
            _, x0[transfer] = _sample_tokens(mask_logits[transfer], temperature, top_p, top_k)
            x[mask_index] = x0.clone()
        else:
            confidence, x0 = _sample_tokens(
                mask_logits,
                temperature,
                top_p,
                top_k,
                margin_confidence=alg == "topk_margin",
                neg_entropy_confidence=alg == "entropy",
            )
            num_mask_token = mask_index.sum() / mask_index.shape[0]
            number = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            if number > 0:
                if alg_temp is None or alg_temp == 0:
                    _, transfer_index = torch.topk(full_confidence, number)
                else:
                    full_confidence = F.softmax(full_confidence / alg_temp, dim=-1)
                    transfer_index = torch.multinomial(full_confidence, num_samples=number)
                x_ = torch.zeros_like(x, dtype=torch.long) + mask_token_id
                x_[mask_index] = x0.clone()
                rows = torch.arange(x.size(0), device=x.device).unsqueeze(1).expand_as(transfer_index)
                x[rows, transfer_index] = x_[rows, transfer_index]
        if soft_mask is not None:
            if sm_timer is not None:
                _sync(x.device)
                start = time.perf_counter()
            embeds = authors_soft_embeddings(model, x, logits, soft_mask, mask_token_id, max_new_tokens)
            if sm_timer is not None:
                _sync(x.device)
                sm_timer.append(time.perf_counter() - start)
    return x
