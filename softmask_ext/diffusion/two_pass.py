"""The soft-masked (SM) forward used in training and in ELBO evaluation.

Pass 1 runs the model on the noised input ``x_t`` without gradient. Its logits (the rows that predict the masked
positions, by the model family's ``logit_shift``) decide, for every masked position, the blend of the mask
embedding with the embeddings of the top-k predicted tokens. Pass 2 runs the model on those embeddings with
gradient: the loss reaches the model weights (or adapters), the embedding table through the blend, and the SM
parameters through lam. Pass 1 builds no autograd graph, so its logits are constants.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..model.family import family_of, prediction_row_index
from ..soft_mask import SoftMask

__all__ = ["model_logits", "soft_mask_forward", "DiffusionTrainingForward"]


def model_logits(model: nn.Module, **inputs: Tensor | None) -> Tensor:
    """Run ``model(**inputs)`` and return its logits, whether it returns a tensor or an output with ``.logits``."""
    out = model(**inputs)
    return out if isinstance(out, Tensor) else out.logits


def soft_mask_forward(
    model: nn.Module,
    soft_mask: SoftMask,
    x_t: Tensor,
    attention_mask: Tensor | None,
    mask_token_id: int,
) -> Tensor:
    """Two-pass SM forward: logits [B, T, V] of pass 2 (gradient flows only through pass 2).

    x_t:            int64 [B, T], the noised input (mask token at masked positions)
    attention_mask: [B, T] with 1 for real tokens, or None

    Pass 1 projects only the hidden rows that predict a masked position (``family_of(model).logit_shift`` says
    which: row ``i - 1`` for position ``i`` for Dream, row ``i`` for LLaDA) through the LM head, so neither the head
    nor the top-k/entropy kernel touch the other rows. The result equals
    ``soft_mask.build_embeddings(x_t, full_pass1_logits, table, mask_token_id, logit_shift)``.
    """
    masked = x_t == mask_token_id
    batch_idx, pos_idx = masked.nonzero(as_tuple=True)
    rows = batch_idx * x_t.shape[1] + prediction_row_index(pos_idx, family_of(model).logit_shift)
    with torch.no_grad():
        first = model_logits(model, input_ids=x_t, attention_mask=attention_mask, logits_rows=rows)  # [N, V]
    embedding = model.get_input_embeddings()
    soft = soft_mask.soft_rows(first, None, x_t[masked], embedding.weight, mask_token_id)
    del first  # [N, V]: release before pass 2 allocates its activations
    embeds = embedding(x_t).index_put((batch_idx, pos_idx), soft)
    return model_logits(model, inputs_embeds=embeds, attention_mask=attention_mask)


class DiffusionTrainingForward(nn.Module):
    """Model + SM parameters as one module, so that data-parallel wrappers see every trainable parameter.

    ``forward(x_t, attention_mask, soft)`` runs the two-pass SM forward when ``soft`` is true, else one plain pass.
    ``soft_mask`` may be None for a run that never takes the SM forward.
    """

    def __init__(self, model: nn.Module, soft_mask: SoftMask | None, mask_token_id: int) -> None:
        super().__init__()
        self.model = model
        self.soft_mask = soft_mask
        self.mask_token_id = int(mask_token_id)

    def forward(self, x_t: Tensor, attention_mask: Tensor | None, soft: bool) -> Tensor:
        if soft:
            return soft_mask_forward(self.model, self.soft_mask, x_t, attention_mask, self.mask_token_id)
        return model_logits(self.model, input_ids=x_t, attention_mask=attention_mask)
