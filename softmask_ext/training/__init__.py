"""Masked-diffusion training with soft-masking: the trainer, adapters, checkpoints, gate initialisation; the
diffusion core it trains with (noise, objective, two-pass SM forward) is :mod:`softmask_ext.diffusion`, re-exported
here."""

from ..diffusion import (
    FINETUNE_NOISE,
    PRETRAIN_NOISE,
    DiffusionTrainingForward,
    NoisedBatch,
    NoiseSchedule,
    apply_noise,
    masked_token_loss,
    model_logits,
    prediction_rows,
    sample_noise,
    sequence_mean_loss,
    soft_mask_forward,
    stream_generator,
)
from ..model.family import align_logits as shift_logits
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

__all__ = [
    "ADAPTER_KINDS",
    "AdapterConfig",
    "apply_adapters",
    "CorruptCheckpointError",
    "latest_checkpoint",
    "latest_good_checkpoint",
    "verify_checkpoint",
    "write_checkpoint",
    "RunFinished",
    "RunFolderError",
    "check_free_space",
    "check_run_folder",
    "check_writable",
    "clear_run_folder",
    "read_metrics",
    "truncate_metrics",
    "DistEnv",
    "init_distributed",
    "confidence_centre",
    "masked_neg_entropy",
    "scale_gradient",
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
    "shift_logits",
    "TrainConfig",
    "Trainer",
    "micro_batch_index",
    "DiffusionTrainingForward",
    "model_logits",
    "soft_mask_forward",
]
