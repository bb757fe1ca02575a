"""The tests' oracle: a plain transcription of Dream's reference decoding, plus the paper's dense soft-masking.

Written for obviousness, not speed: full logits for every position at every step, a Python loop over rows and
positions, and soft-masking as the paper writes it, a dense vocabulary mixture times the embedding table
(``softmask_ext.reference.dense_soft_embeddings``). It shares no code with the engine.

Where Dream leaves a choice open or ties results to its own random calls, the oracle follows the engine's documented
rules, so that tests can compare token for token:

- randomness: each step draws, from one generator and in this order, an fp64 uniform ``u`` ``[B, L]`` (when
  temperature > 0) and a ``[B, L]`` uniform (``origin``) or Gumbel (``alg_temp`` > 0) draw over the decoded columns
  (the ``L`` columns from the first mask token of any prompt, else from the first new token, to the end);
  sampling inverts the CDF (the first token whose cumulative probability, summed in fp64, exceeds ``u`` times the
  total: a draw from ``p``, like Dream's ``Categorical``) and ``alg_temp`` selection is Gumbel-top-k (an exact draw
  without replacement from ``softmax(conf / alg_temp)``, like Dream's ``multinomial``);
- top-p also keeps the tokens whose logit equals the last kept one (Dream's sort leaves the order of equal logits
  open);
- mask tokens in the prompts are decoded too, as Dream does;
- the soft-masking schedules' progress is a row's masks left over its masks at the start (after the tokens hook's
  first edit);
- the number to unmask comes from each row's own mask count (Dream takes the batch mean; they differ when prompts
  hold different numbers of mask tokens or the model predicts the mask token itself), and equal confidences go to the
  earlier position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from softmask_ext.reference import dense_soft_embeddings


def _filtered_probs(logits, temperature, top_p, top_k):
    """Dream's ``sample_tokens`` filters on one row ``[V]``: temperature, top-p, top-k, then softmax."""
    z = logits.float()
    if temperature > 0:
        z = z / temperature
    if top_p is not None and top_p < 1:
        sorted_z, _order = torch.sort(z, descending=True)
        cum = torch.softmax(sorted_z, -1).cumsum(-1)
        remove = cum > top_p
        remove[1:] = remove[:-1].clone()
        remove[0] = False
        last_kept = sorted_z[~remove].min()
        z = torch.where(z < last_kept, torch.full_like(z, torch.finfo(z.dtype).min), z)
    if top_k is not None:
        kth = torch.topk(z, min(top_k, z.numel())).values[-1]
        z = torch.where(z < kth, torch.full_like(z, torch.finfo(z.dtype).min), z)
    return torch.softmax(z, -1)


def _token_and_confidence(probs, alg, temperature, noise):
    if temperature > 0:
        cdf = probs.double().cumsum(0)
        token = min(int((cdf <= float(noise) * float(cdf[-1])).sum()), probs.numel() - 1)
    else:
        token = int(torch.argmax(probs))
    if alg == "topk_margin":
        top = torch.sort(probs, descending=True).values
        return token, float(top[0] - top[1])
    if alg == "entropy":
        return token, float((probs * torch.log(probs + 1e-10)).sum())
    return token, float(probs[token])


def _lam(soft_mask, neg_entropy, progress):
    scale = float(soft_mask.scale)
    if soft_mask.schedule == "linear":
        scale *= progress
    elif soft_mask.schedule == "stepwise":
        scale = scale if progress > 0.5 else 0.0
    return scale * torch.sigmoid(soft_mask.steepness * (neg_entropy - soft_mask.centre))


def _soft_embeddings(model, x, logits, initial_masks, mask_token_id, soft_mask):
    """Plain embeddings, except the still-masked positions: the paper's dense blend."""
    weight = model.get_input_embeddings().weight
    embeds = weight[x].clone()
    batch, total = x.shape
    for b in range(batch):
        positions = [j for j in range(total) if int(x[b, j]) == mask_token_id]
        if not positions:
            continue
        rows = logits[b, positions].float()
        tau = soft_mask.temperature if soft_mask.alg == "mixinputs_with_temp" else 1.0
        log_p = torch.log_softmax(rows / tau, -1)
        p = log_p.exp()
        neg_entropy = (p * log_p).sum(-1)
        lam = _lam(soft_mask, neg_entropy, len(positions) / initial_masks[b])
        if soft_mask.alg == "mixinputs_with_temp":
            mixture = lam[:, None] * p
            mixture[:, mask_token_id] += 1 - lam
            embeds[b, positions] = (mixture @ weight.float()).to(weight.dtype)
        else:
            embeds[b, positions] = dense_soft_embeddings(rows, weight, mask_token_id, lam, soft_mask.k)
    return embeds


@torch.no_grad()
def oracle_generate(
    model,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens=None,
    max_length=None,
    num_return_sequences=1,
    steps,
    temperature=0.0,
    top_p=None,
    top_k=None,
    alg="origin",
    alg_temp=None,
    eps=1e-3,
    mask_token_id,
    soft_mask=None,
    generator=None,
    tokens_hook=None,
    logits_hook=None,
):
    """Returns ``(sequences, history)`` as Dream's ``diffusion_generate`` (history: canvas after each step).

    The length is ``max_new_tokens``, else ``max_length`` minus the prompt (Dream pads to ``max_length``); each prompt
    is repeated ``num_return_sequences`` times in a row first (Dream's ``repeat_interleave``). ``steps`` may exceed
    the masks: Dream's count ``int(masks * (1 - s/t))`` is then 0 on some steps.
    """
    input_ids = input_ids.repeat_interleave(num_return_sequences, 0)
    if attention_mask is not None:
        attention_mask = attention_mask.repeat_interleave(num_return_sequences, 0)
    batch, prompt_len = input_ids.shape
    length = max_new_tokens if max_new_tokens is not None else max_length - prompt_len
    x = F.pad(input_ids, (0, length), value=mask_token_id)
    mask_arg, position_ids = None, None
    if attention_mask is not None and bool((attention_mask == 0).any()):
        mask_arg = F.pad(attention_mask, (0, length), value=1)
        position_ids = mask_arg.long().cumsum(-1) - 1
        position_ids.masked_fill_(mask_arg == 0, 1)
    timesteps = torch.linspace(1, eps, steps + 1)
    prompt_mask_columns = [j for j in range(prompt_len) if bool((input_ids[:, j] == mask_token_id).any())]
    start = prompt_mask_columns[0] if prompt_mask_columns else prompt_len
    if tokens_hook is not None:
        x = tokens_hook(None, x, None)
    initial_masks = [int((x[b] == mask_token_id).sum()) for b in range(batch)]
    embeds = None
    history = []
    for i in range(steps):
        token_noise = None
        if temperature > 0:
            token_noise = torch.empty(batch, x.shape[1] - start, dtype=torch.float64).uniform_(generator=generator)
        select_noise = None
        if alg == "origin":
            select_noise = torch.empty(batch, x.shape[1] - start).uniform_(generator=generator)
        elif alg_temp:
            select_noise = -torch.empty(batch, x.shape[1] - start).exponential_(generator=generator).log()

        mask_index = x == mask_token_id
        if embeds is None:
            logits = model(input_ids=x, attention_mask=mask_arg, position_ids=position_ids).logits
        else:
            logits = model(inputs_embeds=embeds, attention_mask=mask_arg, position_ids=position_ids).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        if logits_hook is not None:
            logits = logits_hook(i, x, logits)
        t, s = timesteps[i], timesteps[i + 1]
        for b in range(batch):
            positions = [j for j in range(x.shape[1]) if bool(mask_index[b, j])]
            # Dream counts the mean over the batch; rows differ with unequal prompt masks or when the model predicts
            # the mask token (the engine's documented choice: each row's own count).
            num_mask_token = torch.tensor(len(positions), dtype=torch.float32)
            number = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            proposals = {}
            for j in positions:
                probs = _filtered_probs(logits[b, j], temperature, top_p, top_k)
                noise = None if token_noise is None else token_noise[b, j - start]
                proposals[j] = _token_and_confidence(probs, alg, temperature, noise)
            if alg == "origin":
                p_transfer = float(1 - s / t) if i < steps - 1 else 1.0
                chosen = [j for j in positions if float(select_noise[b, j - start]) < p_transfer]
            else:
                score = {j: proposals[j][1] for j in positions}
                if alg_temp:
                    score = {
                        j: float(torch.tensor(c) / alg_temp + select_noise[b, j - start]) for j, c in score.items()
                    }
                # Most confident first; equal confidences (common after top-p at low temperature) go to the earlier
                # position, the engine's documented rule (Dream's torch.topk leaves their order unspecified).
                chosen = sorted(positions, key=lambda j: (-score[j], j))[:number]
            for j in chosen:
                x[b, j] = proposals[j][0]
        if tokens_hook is not None:
            x = tokens_hook(i, x, logits)
        if soft_mask is not None:
            embeds = _soft_embeddings(model, x, logits, initial_masks, mask_token_id, soft_mask)
        history.append(x.clone())
    return x, history
