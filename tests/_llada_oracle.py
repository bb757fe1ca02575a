"""The tests' oracle for LLaDA's decoding: a plain transcription of its authors' ``generate`` (semi-autoregressive
blocks, ``low_confidence`` / ``random`` remasking, Gumbel-max sampling in fp64, classifier-free guidance, left-padded
batches), with Fast-dLLM's confidence-threshold rule and the paper's dense soft-masking inside the current block.

Written for obviousness, not speed: full logits for every position at every step, Python loops over rows, soft-masking
as the dense vocabulary mixture. It shares no code with the engine.

Where the published code leaves a choice open or ties results to its own random calls, the oracle follows the
engine's documented rules, so that tests can compare token for token:

- randomness: each step draws, from one generator and in this order, the Gumbel-max uniforms (fp64, one per logit of
  the current block's positions, ``[B, W, V]``; LLaDA draws them for every position, but only the block's can be
  unmasked) when temperature > 0, then the ``random`` remasking scores (fp32 ``[B, W]``);
- equal confidences go to the earlier position (``torch.topk`` leaves their order unspecified);
- with a threshold, a block takes at most ``block_length`` steps (each step unmasks at least one position, unless the
  model predicts the mask token itself, where the published loop would go on for ever);
- soft-masking: each block starts from plain embeddings; after each step the block's still-masked positions get the
  blend of this step's predictions, every other position its plain embedding; the schedules' progress is the
  block's masks left over its masks when the block started.
"""

from __future__ import annotations

import torch
from _decoding_oracle import _soft_embeddings


def num_transfer_tokens(block_masks: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's get_num_transfer_tokens: ``[B, steps]``, the block's masks split evenly, remainder to the first."""
    base, remainder = block_masks // steps, block_masks % steps
    counts = torch.zeros(block_masks.shape[0], steps, dtype=torch.int64) + base[:, None]
    for b in range(block_masks.shape[0]):
        counts[b, : int(remainder[b])] += 1
    return counts


def gumbel_argmax(logits: torch.Tensor, temperature: float, uniform: torch.Tensor | None) -> torch.Tensor:
    """LLaDA's add_gumbel_noise followed by argmax."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    z = logits.to(torch.float64)
    return torch.argmax(z.exp() / (-torch.log(uniform)) ** temperature, dim=-1)


def draw_noise(shape, vocab, temperature, remasking, generator):
    """The step's noise in the engine's order: Gumbel uniforms, then the ``random`` scores."""
    gumbel = None
    if temperature > 0:
        gumbel = torch.empty(*shape, vocab, dtype=torch.float64).uniform_(generator=generator)
    scores = torch.empty(*shape).uniform_(generator=generator) if remasking == "random" else None
    return gumbel, scores


def transfer_index(x0, confidence, masked, count, threshold):
    """Per row: the ``count`` most confident masked positions (ties to the earlier one), or with a ``threshold``
    Fast-dLLM's rule: the most confident, and every other whose confidence is at least ``threshold``."""
    transfer = torch.zeros_like(masked)
    for b in range(masked.shape[0]):
        candidates = [j for j in range(masked.shape[1]) if bool(masked[b, j])]
        ranked = sorted(candidates, key=lambda j: (-float(confidence[b, j]), j))
        if threshold is None:
            chosen = ranked[: int(count[b])]
        else:
            chosen = ranked[:1] + [j for j in ranked[1:] if float(confidence[b, j]) >= threshold]
        for j in chosen:
            transfer[b, j] = True
    return transfer


def block_soft_embeddings(model, x, logits, start, end, mask_id, soft_mask, block_initial):
    """Plain embeddings of ``x``, except the still-masked positions of the block ``[start, end)``: the dense blend
    of their predictions (``logits`` ``[B, T, V]``, row ``i`` predicting position ``i``)."""
    weight = model.get_input_embeddings().weight
    outside = torch.zeros_like(x, dtype=torch.bool)
    outside[:, :start] = True
    outside[:, end:] = True
    hidden = x.masked_fill(outside & (x == mask_id), 0)  # masks outside the block: not blended (restored below)
    embeds = _soft_embeddings(model, hidden, logits, block_initial, mask_id, soft_mask)
    embeds[outside] = weight[x[outside]]
    return embeds


@torch.no_grad()
def llada_generate(
    model,
    prompt,
    attention_mask=None,
    *,
    steps,
    gen_length,
    block_length,
    temperature=0.0,
    cfg_scale=0.0,
    remasking="low_confidence",
    mask_id,
    threshold=None,
    soft_mask=None,
    generator=None,
):
    """LLaDA's ``generate`` (and Fast-dLLM's, with ``threshold``): returns the canvas ``[B, P + gen_length]``."""
    batch, prompt_len = prompt.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt_len] = prompt.clone()
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(batch, gen_length, dtype=attention_mask.dtype)], -1)
    prompt_index = x != mask_id
    weight = model.get_input_embeddings().weight
    embeds = None

    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks

    for num_block in range(num_blocks):
        start = prompt_len + num_block * block_length
        end = start + block_length
        block_mask_index = x[:, start:end] == mask_id
        counts = num_transfer_tokens(block_mask_index.sum(1), steps)
        block_initial = [max(int(block_mask_index[b].sum()), 1) for b in range(batch)]
        if embeds is not None:  # a block starts from plain embeddings everywhere
            embeds = model.get_input_embeddings().weight[x]
        i = 0
        while True:
            gumbel, scores = draw_noise((batch, block_length), weight.shape[0], temperature, remasking, generator)
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                inputs = weight[x] if embeds is None else embeds
                un_inputs = inputs.clone()
                un_inputs[prompt_index] = weight[mask_id]
                both_mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
                logits = model(inputs_embeds=torch.cat([inputs, un_inputs]), attention_mask=both_mask).logits
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            elif embeds is None:
                logits = model(input_ids=x, attention_mask=attention_mask).logits
            else:
                logits = model(inputs_embeds=embeds, attention_mask=attention_mask).logits

            block_logits = logits[:, start:end]
            x0 = gumbel_argmax(block_logits, temperature, gumbel)
            if remasking == "low_confidence":
                p = torch.softmax(block_logits.to(torch.float64), dim=-1)
                x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            else:
                x0_p = scores
            masked = mask_index[:, start:end]
            transfer = transfer_index(x0, x0_p, masked, counts[:, i] if i < steps else None, threshold)
            x[:, start:end][transfer] = x0[transfer]
            if soft_mask is not None:
                embeds = block_soft_embeddings(model, x, logits, start, end, mask_id, soft_mask, block_initial)
            i += 1
            if threshold is None and i == steps:
                break
            if threshold is not None and (i == block_length or not bool((x[:, start:end] == mask_id).any())):
                break
    return x
