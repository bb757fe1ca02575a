"""Masked-diffusion training with soft-masking: noise, objective, the two-pass SM forward, the trainer."""

from .adapters import ADAPTER_KINDS, AdapterConfig, apply_adapters
from .checkpoint import CorruptCheckpointError, latest_checkpoint, verify_checkpoint, write_checkpoint
from .distributed import DistEnv, init_distributed
from .gate_init import confidence_centre, masked_neg_entropy, scale_gradient
from .noise import (
    FINETUNE_NOISE,
    PRETRAIN_NOISE,
    NoisedBatch,
    NoiseSchedule,
    apply_noise,
    sample_noise,
    stream_generator,
)
from .objective import masked_token_loss, prediction_rows, sequence_mean_loss, shift_logits
from .trainer import TrainConfig, Trainer, micro_batch_index
from .two_pass import DiffusionTrainingForward, model_logits, soft_mask_forward

__all__ = [
    "ADAPTER_KINDS", "AdapterConfig", "apply_adapters",
    "CorruptCheckpointError", "latest_checkpoint", "verify_checkpoint", "write_checkpoint",
    "DistEnv", "init_distributed",
    "confidence_centre", "masked_neg_entropy", "scale_gradient",
    "FINETUNE_NOISE", "PRETRAIN_NOISE", "NoisedBatch", "NoiseSchedule", "apply_noise", "sample_noise",
    "stream_generator",
    "masked_token_loss", "prediction_rows", "sequence_mean_loss", "shift_logits",
    "TrainConfig", "Trainer", "micro_batch_index",
    "DiffusionTrainingForward", "model_logits", "soft_mask_forward",
]
