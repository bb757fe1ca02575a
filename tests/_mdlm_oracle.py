"""Test oracles: MDLM's DiT forward, MDLM/ReMDM sampling and the SM-MDLM sampler, transcribed from the published
algorithms in their plain dense form (written independently of the package's code; only the model's weights and its
raw backbone are shared).

- :func:`dit_logits`: MDLM's DiT forward on a state dict in the public checkpoint layout (qkv split as
  ``(three, heads, head_dim)``, rotary on q and k with ``cat(freqs, freqs)`` tables and ``rotate_half``, bias-free
  LayerNorm in fp32, adaLN ``x * (1 + scale) + shift``, gated residuals, final adaLN + linear), mask class ``+ -1e6``.
- :func:`sample`: the sampling loop of the SM-MDLM authors' code (MDLM's ``ddpm_cache`` loop with ReMDM's updates):
  SUBS log-probabilities (``logits - logsumexp``, carry-over), ReMDM's nucleus, the ``mdlm`` / ``remdm-cap`` /
  ``remdm-loop`` updates written with the reference's scalar expressions, fp64 exponential-race sampling with
  ``torch.rand`` noise, the cache of ``p_x0`` when nothing changed, the final argmax pass; with SM, a dense
  transparency head (full softmax, entropy with ``+1e-10`` inside the log, top-k renormalised, the blend as a dense
  ``[B, T, V]`` mixture multiplied by the embedding table).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NEG_INF = -1000000.0


def _layer_norm(x, weight):
    return F.layer_norm(x.float(), [x.shape[-1]]) * weight


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def dit_logits(state, config, x=None, embeds=None):
    """MDLM's DiT (no time conditioning, eval mode) on ``x`` [B, T] or ``embeds`` [B, T, D] -> logits [B, T, V]."""
    s = {k.removeprefix("backbone."): v.float() for k, v in state.items()}
    h = s["vocab_embed.embedding"][x] if embeds is None else embeds.float()
    B, T, D = h.shape
    H = config.n_heads
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    sigma = torch.zeros(B)
    t_freq = torch.cat([torch.cos(sigma[:, None] * freqs), torch.sin(sigma[:, None] * freqs)], -1)
    c = F.linear(
        F.silu(F.linear(t_freq, s["sigma_map.mlp.0.weight"], s["sigma_map.mlp.0.bias"])),
        s["sigma_map.mlp.2.weight"],
        s["sigma_map.mlp.2.bias"],
    )
    c = F.silu(c)
    hd = D // H
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.einsum("i,j->ij", torch.arange(T).float(), inv_freq)
    emb = torch.cat((ang, ang), dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    for i in range(config.n_blocks):
        p = f"blocks.{i}."
        mod = F.linear(c, s[p + "adaLN_modulation.weight"], s[p + "adaLN_modulation.bias"])[:, None]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=2)
        skip = h
        y = _layer_norm(h, s[p + "norm1.weight"]) * (1 + scale_msa) + shift_msa
        qkv = F.linear(y, s[p + "attn_qkv.weight"]).view(B, T, 3, H, hd)
        q = qkv[:, :, 0] * cos + _rotate_half(qkv[:, :, 0]) * sin
        k = qkv[:, :, 1] * cos + _rotate_half(qkv[:, :, 1]) * sin
        v = qkv[:, :, 2]
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd), dim=-1)
        y = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, D)
        h = skip + gate_msa * F.linear(y, s[p + "attn_out.weight"])
        y = _layer_norm(h, s[p + "norm2.weight"]) * (1 + scale_mlp) + shift_mlp
        y = F.linear(
            F.gelu(F.linear(y, s[p + "mlp.0.weight"], s[p + "mlp.0.bias"]), approximate="tanh"),
            s[p + "mlp.2.weight"],
            s[p + "mlp.2.bias"],
        )
        h = h + gate_mlp * y
    shift, scale = F.linear(c, s["output_layer.adaLN_modulation.weight"], s["output_layer.adaLN_modulation.bias"])[
        :, None
    ].chunk(2, dim=2)
    h = _layer_norm(h, s["output_layer.norm_final.weight"]) * (1 + scale) + shift
    logits = F.linear(h, s["output_layer.linear.weight"], s["output_layer.linear.bias"])
    logits[:, :, config.mask_token_id] += NEG_INF
    return logits


class DenseTransparencyHead:
    """The authors' SM head, dense: lam from the full softmax's negative entropy, blend of the top-k."""

    def __init__(self, soft_mask, mask_index):
        self.scale, self.steep = float(soft_mask.scale.detach()), float(soft_mask.steepness.detach())
        self.centre, self.k, self.mask_index = float(soft_mask.centre.detach()), soft_mask.k, mask_index

    def embeds(self, x, log_p, table):
        p = torch.softmax(log_p, dim=-1)
        neg_entropy = (p * torch.log(p + 1e-10)).sum(-1)
        masked = x == self.mask_index
        lam = torch.where(masked, self.scale * torch.sigmoid(self.steep * (neg_entropy - self.centre)), 0.0)[..., None]
        top_logits, top_ids = torch.topk(log_p, self.k, dim=-1)
        mixture = torch.zeros_like(p).scatter_(-1, top_ids, torch.softmax(top_logits.float(), -1))
        one_hot = F.one_hot(x, p.shape[-1]).float()
        return ((1 - lam) * one_hot + lam * mixture) @ table.float()


def _subs(logits, x, mask_index):
    logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    unmasked = x != mask_index
    logits[unmasked] = NEG_INF
    logits[unmasked, x[unmasked]] = 0
    return logits


def _categorical(probs, generator):
    probs = probs.to(torch.float64)
    gumbel_norm = 1e-10 - (torch.rand(probs.shape, dtype=torch.float64, generator=generator) + 1e-10).log()
    return (probs / gumbel_norm).argmax(dim=-1)


def sample(
    backbone,
    x,
    mask_index,
    *,
    steps,
    sampler="mdlm",
    eps=1e-5,
    eta=0.0,
    t_on=0.55,
    t_off=0.05,
    alpha_on=0.9,
    p_nucleus=1.0,
    head=None,
    table=None,
    generator=None,
):
    """The reference loop. ``backbone(x=..., embeds=...) -> logits`` [B, T, V] (mask class already at -1e6)."""

    def forward(x, log_p_prev):
        if head is not None and log_p_prev is not None:
            logits = backbone(embeds=head.embeds(x, log_p_prev, table))
        else:
            logits = backbone(x=x)
        return _subs(logits.float().clone(), x, mask_index)

    timesteps = torch.linspace(1, eps, steps + 1)
    dt = (1 - eps) / steps
    p_x0_cache, log_p_sm, forwards = None, None, 0
    for i in range(steps):
        t = timesteps[i] * torch.ones(x.shape[0], 1)
        t = t.squeeze(-1)
        move_chance_t, move_chance_s = t[:, None, None], (t - dt)[:, None, None]
        p_x0 = p_x0_cache
        if p_x0 is None:
            log_p_sm = forward(x, log_p_sm)
            forwards += 1
            p_x0 = log_p_sm.exp()
            if p_nucleus < 1:
                sorted_probs, sorted_indices = torch.sort(p_x0, descending=True, dim=-1)
                top_p_mask = torch.cumsum(sorted_probs, dim=-1) <= p_nucleus
                top_p_mask[..., 0] = True
                nucleus_probs = sorted_probs * top_p_mask
                nucleus_probs /= nucleus_probs.sum(dim=-1, keepdim=True)
                p_x0 = torch.zeros_like(p_x0).scatter_(-1, sorted_indices, nucleus_probs)
        copy_flag = x != mask_index

        def ancestral(mct, mcs, p_x0=p_x0, x=x, copy_flag=copy_flag):
            q_xs = p_x0 * (mct - mcs)
            q_xs[:, :, mask_index] = mcs[:, :, 0]
            _x = _categorical(q_xs, generator)
            return torch.where(copy_flag, x, _x)

        def remask(alpha_t, alpha_s, sigma, p_x0=p_x0, copy_flag=copy_flag):
            q_xs = p_x0 * (1 - sigma)
            q_xs[..., mask_index] = sigma
            q_xs_2 = p_x0 * ((alpha_s - (1 - sigma) * alpha_t) / (1 - alpha_t))
            q_xs_2[..., mask_index] = (1 - alpha_s - sigma * alpha_t) / (1 - alpha_t)
            return _categorical(torch.where(copy_flag.unsqueeze(-1), q_xs, q_xs_2), generator)

        if sampler == "mdlm":
            xs = ancestral(move_chance_t, move_chance_s)
        elif sampler == "remdm-cap":
            alpha_t, alpha_s = (1 - move_chance_t)[0].item(), (1 - move_chance_s)[0].item()
            sigma = min(eta, (1 - alpha_s) / alpha_t) if alpha_t > 0 else eta
            xs = remask(alpha_t, alpha_s, sigma)
        else:
            time = t[0].item()
            if time > t_on:
                xs = ancestral(
                    (1 - (1 - t) * alpha_on / (1 - t_on))[:, None, None],
                    (1 - (1 - t + dt) * alpha_on / (1 - t_on))[:, None, None],
                )
            elif time <= t_off:
                xs = ancestral(
                    (t * (1 - alpha_on) / t_off)[:, None, None], ((t - dt) * (1 - alpha_on) / t_off)[:, None, None]
                )
            else:
                xs = remask(alpha_on, alpha_on, eta)
        p_x0_cache = p_x0 if torch.equal(xs, x) else None
        x = xs
    final = forward(x, log_p_sm)
    return final.argmax(dim=-1), forwards + 1
