"""The diffusion core shared by training and evaluation: the noise schedule, the masked-token objective and the
two-pass soft-masked forward. Every row alignment in it follows the model family's ``logit_shift``."""

from .noise import (
    FINETUNE_NOISE,
    PRETRAIN_NOISE,
    NoisedBatch,
    NoiseSchedule,
    apply_noise,
    sample_noise,
    stream_generator,
)
from .objective import masked_token_loss, prediction_rows, sequence_mean_loss
from .two_pass import DiffusionTrainingForward, model_logits, soft_mask_forward

__all__ = [
    "FINETUNE_NOISE",
    "PRETRAIN_NOISE",
    "NoisedBatch",
    "NoiseSchedule",
    "apply_noise",
    "sample_noise",
    "stream_generator",
    "masked_token_loss",
    "prediction_rows",
    "sequence_mean_loss",
    "DiffusionTrainingForward",
    "model_logits",
    "soft_mask_forward",
]
