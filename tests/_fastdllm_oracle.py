"""The tests' oracle for block-wise decoding with K/V caches: plain transcriptions of Fast-dLLM's loops
(``llada/generate.py``: ``generate_with_prefix_cache``, ``generate_with_dual_cache``; ``dream/model/
generation_utils_block.py``: ``_sample`` with and without ``dual_cache``), with the paper's dense soft-masking in the
current block.

The cached forward is written here from the model's weights, as Fast-dLLM's modified models compute it: each layer
keeps its K/V *before* the rotary embedding; a prefix-cache forward concatenates the cached prefix with the fresh
K/V of the positions it runs, a dual-cache forward overwrites the block's columns of the full cached K/V; the rotary
embedding is then applied to the whole key sequence. It shares no code with the engine or its cache: it reads each
layer's norm weights and projections under its family's names (Dream's Qwen2 layout, or LLaDA's OLMo layout as in
LLaDA's ``LLaDALlamaBlock``) and computes norms, attention and MLP itself.

Where Fast-dLLM leaves a choice open or ties results to its own random calls, the oracle follows the engine's
documented rules (see ``_decoding_oracle`` and ``_llada_oracle``): noise per step over the block's positions in the
engine's order; equal confidences to the earlier position; per-row counts and thresholds (Fast-dLLM's threshold
path takes row 0 only); at most ``block_length`` threshold steps per block.

Dream's loop with ``compat=False`` is the engine's own block-wise Dream decoding (not a published loop): each block's
first forward unmasks by the normal rule, fixed-count steps rank by ``alg``, and the query window starts one position
before the block so that the row predicting the block's first position is recomputed (its K/V too).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from _decoding_oracle import _filtered_probs, _token_and_confidence
from _llada_oracle import (
    block_soft_embeddings,
    draw_noise,
    gumbel_argmax,
    num_transfer_tokens,
    transfer_index,
)
from torch import nn

from softmask_ext.model.dream import DecoderLayer
from softmask_ext.model.llada import LLaDABlock


def _rotate(x, positions, theta):
    """Rotary embedding of ``[B, H, T, D]`` at ``positions`` ``[T]`` (dimension i paired with i + D/2)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    angles = positions.float()[:, None] * inv_freq
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LayerParts(NamedTuple):
    """One pre-norm block: ``x + o(attention(q, k, v of attn_norm(x)))``, then ``x + down(silu(gate(h)) * up(h))``
    with ``h = mlp_norm(x)``; norms are RMS norms with these weights, the rest are linear layers."""

    attn_norm: torch.Tensor
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp_norm: torch.Tensor
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


def layer_parts(layer: nn.Module) -> LayerParts:
    """A decoder layer's parts under its family's module names."""
    if isinstance(layer, LLaDABlock):  # LLaDA: ff_proj is the gated projection, ff_out the down projection
        return LayerParts(
            layer.attn_norm.weight,
            layer.q_proj,
            layer.k_proj,
            layer.v_proj,
            layer.attn_out,
            layer.ff_norm.weight,
            layer.ff_proj,
            layer.up_proj,
            layer.ff_out,
        )
    if not isinstance(layer, DecoderLayer):
        raise TypeError(f"the oracle knows no layout for {type(layer).__name__}")
    attn, mlp = layer.self_attn, layer.mlp  # Dream (Qwen2)
    return LayerParts(
        layer.input_layernorm.weight,
        attn.q_proj,
        attn.k_proj,
        attn.v_proj,
        attn.o_proj,
        layer.post_attention_layernorm.weight,
        mlp.gate_proj,
        mlp.up_proj,
        mlp.down_proj,
    )


def _rms_norm(x, weight, eps):
    """Both families' RMS norm: in fp32, cast back before the weight."""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def cached_forward(model, inputs, first, past=None, replace=None):
    """Fast-dLLM's forward of the positions ``first .. first + Q - 1`` (``inputs`` embeddings ``[B, Q, D]``).

    ``past``: per layer ``(K, V)`` ``[B, H_kv, T', D]`` before rotary; with ``replace=(start, end)`` (dual cache) the
    fresh K/V overwrite those columns of ``past`` (in place, as Fast-dLLM does), else they are appended to it (prefix
    cache). Returns (logits ``[B, Q, V]``, the new per-layer K/V).
    """
    config = model.config
    layers, norm = model.decoder_stack().layers_and_norm()
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    eps = config.rms_norm_eps
    h = inputs
    B, Q, _ = h.shape
    query_positions = torch.arange(first, first + Q)
    present = []
    for index, layer in enumerate(layers):
        part = layer_parts(layer)
        a = _rms_norm(h, part.attn_norm, eps)
        q = part.q(a).view(B, Q, heads, head_dim).transpose(1, 2)
        k = part.k(a).view(B, Q, kv_heads, head_dim).transpose(1, 2)
        v = part.v(a).view(B, Q, kv_heads, head_dim).transpose(1, 2)
        if past is not None:
            past_k, past_v = past[index]
            if replace is not None:
                past_k[:, :, replace[0] : replace[1]] = k
                past_v[:, :, replace[0] : replace[1]] = v
                k, v = past_k, past_v
            else:
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        present.append((k, v))
        q = _rotate(q, query_positions, config.rope_theta)
        k = _rotate(k, torch.arange(k.shape[2]), config.rope_theta)
        groups = heads // kv_heads
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1))
        h = h + part.o(out.transpose(1, 2).reshape(B, Q, heads * head_dim))
        m = _rms_norm(h, part.mlp_norm, eps)
        h = h + part.down(F.silu(part.gate(m)) * part.up(m))
    return model.get_output_embeddings()(_rms_norm(h, norm.weight, eps)), present


def _embed(model, x, embeds):
    return model.get_input_embeddings().weight[x] if embeds is None else embeds


@torch.no_grad()
def llada_cached(
    model,
    prompt,
    *,
    steps,
    gen_length,
    block_length,
    temperature=0.0,
    remasking="low_confidence",
    mask_id,
    threshold=None,
    dual=False,
    soft_mask=None,
    generator=None,
):
    """Fast-dLLM's ``generate_with_prefix_cache`` (``dual=False``) or ``generate_with_dual_cache``."""
    batch, prompt_len = prompt.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt_len] = prompt.clone()
    vocab = model.config.vocab_size
    embeds = None
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks

    for num_block in range(num_blocks):
        start = prompt_len + num_block * block_length
        end = start + block_length
        counts = num_transfer_tokens((x[:, start:end] == mask_id).sum(1), steps)
        if embeds is not None:  # a block starts from plain embeddings everywhere
            embeds = model.get_input_embeddings().weight[x]
        block_initial = [max(int((x[b, start:end] == mask_id).sum()), 1) for b in range(batch)]

        def decide(logits, i, first, start=start, end=end, counts=counts, block_initial=block_initial):
            """Unmask in the block from ``logits`` ``[B, Q, V]`` of the positions ``first ..``."""
            nonlocal embeds
            gumbel, scores = draw_noise((batch, block_length), vocab, temperature, remasking, generator)
            block_logits = logits[:, start - first : end - first]
            x0 = gumbel_argmax(block_logits, temperature, gumbel)
            if remasking == "low_confidence":
                x0_p = torch.softmax(block_logits.to(torch.float64), -1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
            else:
                x0_p = scores
            masked = x[:, start:end] == mask_id
            transfer = transfer_index(x0, x0_p, masked, counts[:, i] if i < steps else None, threshold)
            x[:, start:end][transfer] = x0[transfer]
            if soft_mask is not None:
                full = torch.zeros(batch, x.shape[1], vocab, dtype=logits.dtype)
                full[:, first : first + logits.shape[1]] = logits
                embeds = block_soft_embeddings(model, x, full, start, end, mask_id, soft_mask, block_initial)

        logits, past = cached_forward(model, _embed(model, x, embeds), 0)
        decide(logits, 0, 0)
        if not dual:
            past = [(k[:, :, :start], v[:, :, :start]) for k, v in past]
        # The published loop stops as soon as the block is decoded; with fixed counts the engine runs every step
        # (the later ones unmask nothing) and draws their noise, so the oracle does too.
        for i in range(1, block_length if threshold is not None else steps):
            if threshold is not None and not bool((x[:, start:end] == mask_id).any()):
                break
            if dual:
                logits, _ = cached_forward(model, _embed(model, x, embeds)[:, start:end], start, past, (start, end))
            else:
                logits, _ = cached_forward(model, _embed(model, x, embeds)[:, start:], start, past)
            decide(logits, i, start)
    return x


@torch.no_grad()
def dream_blocks(
    model,
    prompt,
    *,
    steps,
    max_new_tokens,
    block_length,
    cache,
    temperature=0.0,
    top_p=None,
    top_k=None,
    alg="entropy",
    alg_temp=None,
    eps=1e-3,
    threshold=None,
    compat=True,
    soft_mask=None,
    generator=None,
):
    """Fast-dLLM's Dream ``_sample`` (``cache`` "prefix" or "dual", ``compat=True``), or the engine's block-wise
    Dream decoding (``compat=False``; ``cache`` "none", "prefix" or "dual")."""
    mask_id = model.config.mask_token_id
    batch, prompt_len = prompt.shape
    x = F.pad(prompt, (0, max_new_tokens), value=mask_id)
    num_blocks = max_new_tokens // block_length
    assert max_new_tokens % block_length == 0 and steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    timesteps = torch.linspace(1, eps, steps_per_block + 1)
    embeds = None
    rank_alg = ("maskgit_plus" if threshold is not None else "entropy") if compat else alg

    for num_block in range(num_blocks):
        start = prompt_len + num_block * block_length
        end = start + block_length
        block_initial = [max(int((x[b, start:end] == mask_id).sum()), 1) for b in range(batch)]
        if embeds is not None:  # a block starts from plain embeddings everywhere
            embeds = model.get_input_embeddings().weight[x]

        def decide(shifted, i, first, first_only, start=start, end=end, block_initial=block_initial):
            """Unmask in the block from Dream-shifted ``logits`` ``[B, Q, V]`` of the positions ``first ..``."""
            nonlocal embeds
            token_noise = None
            if temperature > 0:
                token_noise = torch.empty(batch, block_length, dtype=torch.float64).uniform_(generator=generator)
            select_noise = None
            if alg == "origin" and not compat:
                select_noise = torch.empty(batch, block_length).uniform_(generator=generator)
            elif alg_temp and not first_only:
                select_noise = -torch.empty(batch, block_length).exponential_(generator=generator).log()
            elif alg_temp:
                torch.empty(batch, block_length).exponential_(generator=generator)  # drawn, unused, as the engine
            for b in range(batch):
                positions = [j for j in range(start, end) if int(x[b, j]) == mask_id]
                proposals = {}
                for j in positions:
                    probs = _filtered_probs(shifted[b, j - first], temperature, top_p, top_k)
                    noise = None if token_noise is None else token_noise[b, j - start]
                    proposals[j] = _token_and_confidence(probs, rank_alg, temperature, noise)
                if first_only:
                    chosen = [j for j in positions if j == start]
                elif rank_alg == "origin":
                    p_transfer = float(1 - timesteps[i + 1] / timesteps[i]) if i < steps_per_block - 1 else 1.0
                    chosen = [j for j in positions if float(select_noise[b, j - start]) < p_transfer]
                elif threshold is not None:
                    ranked = sorted(positions, key=lambda j: (-proposals[j][1], j))
                    chosen = ranked[:1] + [j for j in ranked[1:] if proposals[j][1] >= threshold]
                else:
                    t, s = timesteps[i], timesteps[i + 1]
                    number = (
                        int(torch.tensor(float(len(positions))) * (1 - s / t))
                        if i < steps_per_block - 1
                        else len(positions)
                    )
                    score = {j: proposals[j][1] for j in positions}
                    if alg_temp:
                        score = {
                            j: float(torch.tensor(c) / alg_temp + select_noise[b, j - start]) for j, c in score.items()
                        }
                    chosen = sorted(positions, key=lambda j: (-score[j], j))[:number]
                for j in chosen:
                    x[b, j] = proposals[j][0]
            if soft_mask is not None:
                full = torch.zeros(batch, x.shape[1], shifted.shape[-1], dtype=shifted.dtype)
                full[:, first : first + shifted.shape[1]] = shifted
                embeds = block_soft_embeddings(model, x, full, start, end, mask_id, soft_mask, block_initial)

        def shift(logits):
            return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

        first = start if compat else max(start - 1, 0)
        for i in range(block_length if threshold is not None else steps_per_block):
            if cache == "none" or i == 0:
                logits, past = cached_forward(model, _embed(model, x, embeds), 0)
                if cache == "prefix":
                    past = [(k[:, :, :first], v[:, :, :first]) for k, v in past]
                decide(shift(logits), i, 0, compat)
            elif cache == "dual":
                logits, _ = cached_forward(model, _embed(model, x, embeds)[:, first:end], first, past, (first, end))
                decide(shift(logits), i, first, False)
            else:
                logits, _ = cached_forward(model, _embed(model, x, embeds)[:, first:], first, past)
                decide(shift(logits), i, first, False)
            if threshold is not None and not bool((x[:, start:end] == mask_id).any()):
                break
    return x
