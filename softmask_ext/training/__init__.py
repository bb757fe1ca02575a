"""Masked-diffusion training with soft-masking: noise, objective, the two-pass SM forward, the trainer."""

from .adapters import ADAPTER_KINDS, AdapterConfig, apply_adapters
from .checkpoint import (
    CorruptCheckpointError,
    latest_checkpoint,
    latest_good_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)
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
from .objective import masked_token_loss, prediction_rows, shift_logits
from .run_folder import (
    RunFinished,
    RunFolderError,
    check_free_space,
    check_run_folder,
    check_writable,
    clear_run_folder,
    read_metrics,
    truncate_metrics,
)
from .trainer import TrainConfig, Trainer, micro_batch_index
from .two_pass import DiffusionTrainingForward, model_logits, soft_mask_forward

__all__ = [
    "ADAPTER_KINDS", "AdapterConfig", "apply_adapters",
    "CorruptCheckpointError", "latest_checkpoint", "latest_good_checkpoint", "verify_checkpoint", "write_checkpoint",
    "RunFinished", "RunFolderError", "check_free_space", "check_run_folder", "check_writable", "clear_run_folder",
    "read_metrics", "truncate_metrics",
    "DistEnv", "init_distributed",
    "confidence_centre", "masked_neg_entropy", "scale_gradient",
    "FINETUNE_NOISE", "PRETRAIN_NOISE", "NoisedBatch", "NoiseSchedule", "apply_noise", "sample_noise",
    "stream_generator",
    "masked_token_loss", "prediction_rows", "shift_logits",
    "TrainConfig", "Trainer", "micro_batch_index",
    "DiffusionTrainingForward", "model_logits", "soft_mask_forward",
]
