"""MDLM training: binary pretraining and soft-masked (SM) continued pretraining of a DiT MDLM on packed text blocks.

One optimizer step takes a global batch of ``batch_size`` blocks, split over the ``torchrun`` processes (gradients
averaged as DDP does, so ``W`` processes give the result of one process with ``W`` times the accumulation steps) and
into ``grad_accum`` micro-batches per process. The model is replicated, or sharded with FSDP2 (:mod:`.fsdp`: each
DiT block a unit, the SM parameters replicated, the EMA sharded like the weights) when ``fsdp`` asks for it or it
would not fit one GPU for training; checkpoints hold the same full tensors either way. Times are MDLM's
per-sample antithetic draws over the global batch; every token is masked with probability ``1 - alpha_t`` (no forced
mask); the loss is ``sum -log p / t`` over the step's masked tokens divided by the step's valid tokens. Each
micro-batch flips a coin with probability ``sm_prob`` for the two-pass SM forward. AdamW (SM parameters in their own
group at ``sm_lr``, no weight decay), gradient clipping, constant learning rate after a linear warm-up
(transformers' ``constant_schedule_with_warmup``), and an EMA of the model's weights after every step, which is what
:meth:`MDLMTrainer.evaluate` and the saved ``final/`` model use (SM always on at evaluation).

Randomness comes from generators seeded by ``(seed, stream, index)`` and the data order from ``(seed, epoch)``,
so a checkpoint (weights, EMA, SM parameters, optimizer and scheduler, data position) resumes exactly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ..conventions import EMA_WEIGHTS, MODEL_WEIGHTS, SOFT_MASK_WEIGHTS
from ..data import BatchStream, Example
from ..diffusion.mdlm_objective import antithetic_times, mask_tokens, mdlm_loss
from ..diffusion.noise import stream_generator
from ..diffusion.two_pass import DiffusionTrainingForward
from ..environment import environment
from ..model.family import family_of
from ..soft_mask import SoftMask
from .checkpoint import latest_checkpoint, write_checkpoint
from .distributed import DistEnv, all_reduce_sum, average_gradients, barrier
from .ema import EMA
from .fsdp import (
    FULL_STATE,
    ShardedTrainingForward,
    clip_grad_norm,
    gather_full_tensors,
    load_full_state,
    save_trainable_state,
    shard,
    use_fsdp,
)
from .run_folder import truncate_metrics

__all__ = ["MDLM_PRESETS", "MDLMTrainConfig", "MDLMTrainer", "mdlm_preset"]

_TIME_STREAM, _MASK_STREAM, _COIN_STREAM, _DROPOUT_STREAM, _EVAL_STREAM = 11, 12, 13, 14, 15


@dataclass
class MDLMTrainConfig:
    """Hyper-parameters of an MDLM run (``batch_size`` is the global batch of one optimizer step over all processes,
    ``grad_accum`` the micro-batches of each process; ``fsdp`` shards the model over the processes, which needs
    several)."""

    run_dir: str
    max_steps: int
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    sm_lr: float = 1e-2
    sm_eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 2500
    clip: float = 1.0
    sm_prob: float = 0.0
    sm_k: int = 3
    ema: float = 0.9999
    seed: int = 0
    eval_batches: int = 4
    save_every: int = 0
    fsdp: bool = False

    def __post_init__(self) -> None:
        checks = {
            "max_steps >= 1": self.max_steps >= 1,
            "batch_size >= 1": self.batch_size >= 1,
            "grad_accum >= 1 dividing batch_size": self.grad_accum >= 1 and self.batch_size % self.grad_accum == 0,
            "lr > 0": self.lr > 0,
            "sm_lr > 0": self.sm_lr > 0,
            "sm_eps > 0": self.sm_eps > 0,
            "weight_decay >= 0": self.weight_decay >= 0,
            "warmup_steps >= 0": self.warmup_steps >= 0,
            "clip > 0": self.clip > 0,
            "0 <= sm_prob <= 1": 0 <= self.sm_prob <= 1,
            "0 <= ema < 1": 0 <= self.ema < 1,
            "eval_batches >= 1": self.eval_batches >= 1,
            "save_every >= 0": self.save_every >= 0,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid MDLM training configuration: need {', '.join(failed)}")


#: The authors' recipes: binary MDLM pretraining, and SM continued pretraining of the 169M model.
MDLM_PRESETS: dict[str, dict[str, Any]] = {
    "mdlm-pretrain": {
        "lr": 3e-4,
        "weight_decay": 0.0,
        "clip": 1.0,
        "warmup_steps": 2500,
        "ema": 0.9999,
        "sm_prob": 0.0,
    },
    "mdlm-sm-paper": {
        "lr": 3e-4,
        "sm_lr": 1e-2,
        "weight_decay": 0.0,
        "clip": 1.0,
        "warmup_steps": 2500,
        "ema": 0.9999,
        "sm_prob": 0.8,
        "sm_k": 3,
    },
}


def mdlm_preset(name: str, **overrides: Any) -> MDLMTrainConfig:
    """A :class:`MDLMTrainConfig` from a preset of :data:`MDLM_PRESETS` and overrides (``run_dir``, ``max_steps``)."""
    if name not in MDLM_PRESETS:
        raise ValueError(f"unknown MDLM preset {name!r}; expected one of {sorted(MDLM_PRESETS)}")
    return MDLMTrainConfig(**{**MDLM_PRESETS[name], **overrides})


class MDLMTrainer:
    """MDLM training over fixed-length blocks (``Example`` of equal length, all tokens valid), in one process or
    data-parallel over ``torchrun`` processes (``env``; the model replicated or sharded, rank 0 writes the files).

    Args:
        model: an MDLM-family model (trained in full).
        config: the run's hyper-parameters.
        train, validation: the blocks.
        soft_mask: the SM module to train (default: a fresh ``SoftMask(k=config.sm_k)`` when ``sm_prob > 0``).
        env: the process group (:func:`softmask_ext.training.init_distributed`); default one process.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MDLMTrainConfig,
        train: Sequence[Example],
        validation: Sequence[Example],
        soft_mask: SoftMask | None = None,
        env: DistEnv | None = None,
    ) -> None:
        env = env if env is not None else DistEnv()
        if config.batch_size % (env.world_size * config.grad_accum):
            raise ValueError(
                f"batch_size {config.batch_size} must split into {env.world_size} processes x "
                f"{config.grad_accum} micro-batches"
            )
        self.model, self.config, self.validation, self.env = model, config, validation, env
        self.device = device = model.get_input_embeddings().weight.device
        if soft_mask is None and config.sm_prob > 0:
            soft_mask = SoftMask(k=config.sm_k)
        self.soft_mask = soft_mask.to(device) if soft_mask is not None else None
        self.mask_token_id, self.logit_shift = model.config.mask_token_id, family_of(model).logit_shift
        self.sharded = use_fsdp(config.fsdp, env, model, device)
        forward = ShardedTrainingForward if self.sharded else DiffusionTrainingForward
        self.forward = forward(model, self.soft_mask, self.mask_token_id)
        if self.sharded:  # before the optimizer and the EMA, which must hold the sharded parameters
            shard(self.forward, env, device, bf16=False)
        groups = [
            {
                "params": [p for p in model.parameters() if p.requires_grad],
                "lr": config.lr,
                "weight_decay": config.weight_decay,
            }
        ]
        if self.soft_mask is not None:
            # Adam's eps of the SM group: at the paper's initialisation (scale 1e-6) the scale's gradient is ~1e-12,
            # far below the usual 1e-8, so the recipe's SM parameters start moving only after many updates.
            groups.append(
                {
                    "params": list(self.soft_mask.parameters()),
                    "lr": config.sm_lr,
                    "weight_decay": 0.0,
                    "eps": config.sm_eps,
                }
            )
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: step / warmup if step < warmup else 1.0
        )
        self.ema = EMA(model, config.ema)
        pad = getattr(model.config, "pad_token_id", None)
        self.stream = BatchStream(
            train,
            config.batch_size,
            pad if pad is not None else 0,
            config.seed,
            rank=env.rank,
            world_size=env.world_size,
        )
        self.run_dir = Path(config.run_dir)
        self.step = 0

    # ------------------------------------------------------------------------------------------------ training
    def _micro_batch_index(self, accum_index: int, rank: int) -> int:
        """The index of a micro-batch of this step in one process with ``world_size * grad_accum`` micro-batches."""
        return (self.step * self.env.world_size + rank) * self.config.grad_accum + accum_index

    def _sm_coin(self, index: int) -> bool:
        coin = torch.rand((), generator=stream_generator(self.config.seed, _COIN_STREAM, index)).item()
        return self.soft_mask is not None and coin < self.config.sm_prob

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns the step's loss (nats per token), the share of SM micro-batches, the lr."""
        cfg, env = self.config, self.env
        self.forward.train()
        batch = next(self.stream)["input_ids"].to(self.device)  # this rank's slice
        # Times over the global batch; this rank's slice, as BatchStream slices the blocks.
        times = antithetic_times(cfg.batch_size, stream_generator(cfg.seed, _TIME_STREAM, self.step))
        times = times[env.rank * batch.shape[0] : (env.rank + 1) * batch.shape[0]]
        micro = batch.shape[0] // cfg.grad_accum
        # The SM coin of every micro-batch of every process (FSDP keeps processes in lockstep with it).
        coins = [
            [self._sm_coin(self._micro_batch_index(a, r)) for r in range(env.world_size)] for a in range(cfg.grad_accum)
        ]
        total = torch.zeros(())
        self.optimizer.zero_grad(set_to_none=True)
        for a in range(cfg.grad_accum):
            index = self._micro_batch_index(a, env.rank)
            x0, t = batch[a * micro : (a + 1) * micro], times[a * micro : (a + 1) * micro]
            torch.manual_seed(stream_generator(cfg.seed, _DROPOUT_STREAM, index).initial_seed() >> 1)  # dropout
            x_t = mask_tokens(x0, t, self.mask_token_id, stream_generator(cfg.seed, _MASK_STREAM, index))
            options = {"lockstep_pass1": any(coins[a])} if self.sharded else {}
            logits = self.forward(x_t, None, coins[a][env.rank], **options)
            loss_sum = mdlm_loss(logits, x0, t, x_t, self.mask_token_id, self.logit_shift)
            # This process's mean; averaged over processes below, or by FSDP's reduce-scatter.
            (loss_sum / batch.numel()).backward()
            total += loss_sum.detach().cpu()
        # Averaging the per-process means gives the mean over the global batch (FSDP's reduce-scatter averaged the
        # sharded weights' already). The SM parameters are replicated either way.
        if not self.sharded:
            average_gradients(self.model.parameters(), env)
        if self.soft_mask is not None:
            average_gradients(self.soft_mask.parameters(), env)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        clip = clip_grad_norm if self.sharded else torch.nn.utils.clip_grad_norm_
        grad_norm = clip(params, cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        self.step += 1
        return {
            "step": self.step,
            "loss": all_reduce_sum(float(total), env, self.device) / (batch.numel() * env.world_size),
            "grad_norm": float(grad_norm),
            "sm_share": sum(map(sum, coins)) / (cfg.grad_accum * env.world_size),
            "lr": self.scheduler.get_last_lr()[0],
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation ELBO (nats per token) and its perplexity bound with the EMA weights, SM on when trained.
        Every process evaluates the same blocks (under FSDP, the same forwards)."""
        from ..evaluation.mdlm_metrics import elbo_perplexity

        with self.ema.averaged(self.model):
            result = elbo_perplexity(
                self.model,
                self.validation,
                soft_mask=self.soft_mask,
                batch_size=self.config.batch_size // (self.config.grad_accum * self.env.world_size),
                max_batches=self.config.eval_batches,
                seed=self.config.seed,
                forward=self.forward,
            )
            if self.sharded:  # a forward without gradient leaves the root unit gathered: shard it before the restore
                self.forward.reshard()
        return result

    def train(self) -> dict[str, Any]:
        """Run to ``max_steps`` (resuming from the run directory's latest checkpoint); writes ``metrics.jsonl``,
        checkpoints, ``final/`` (EMA weights + ``transparency_config.json``) and ``summary.json``."""
        main = self.env.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier(self.env)
        self.resume()
        while self.step < self.config.max_steps:
            record = self.train_step()
            if main:
                with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as log:
                    log.write(json.dumps(record) + "\n")
            if self.config.save_every and self.step % self.config.save_every == 0:
                self.save_checkpoint()
        summary = {"steps": self.step, "validation": self.evaluate(), "config": dataclasses.asdict(self.config)}
        summary["environment"] = environment(self.device)
        final = self.run_dir / "final"
        with self.ema.averaged(self.model):
            state = self._model_state()
            if main:
                save_trainable_state(self.model, state, final)
        if not main:
            return summary
        if self.soft_mask is not None:
            self.soft_mask.save_transparency_config(final)
            summary["soft_mask"] = self.soft_mask.to_transparency_config()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _model_state(self) -> dict[str, torch.Tensor]:
        """The model's full weights by name (under FSDP gathered on the CPU of rank 0, empty elsewhere; collective)."""
        return get_model_state_dict(self.model, options=FULL_STATE) if self.sharded else self.model.state_dict()

    def save_checkpoint(self) -> Path | None:
        """Atomically write everything needed to continue exactly (all processes gather full tensors, rank 0 writes;
        returns its path there). The files are the same with or without FSDP."""
        model_state = self._model_state()
        ema_state = gather_full_tensors(self.ema.state_dict(), keep=self.env.is_main)
        optimizer_state = get_optimizer_state_dict(
            self.forward, self.optimizer, options=FULL_STATE if self.sharded else None
        )

        def write(directory: Path) -> None:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(directory / MODEL_WEIGHTS)
            )
            save_file(ema_state, str(directory / EMA_WEIGHTS))
            if self.soft_mask is not None:
                save_file(
                    {k: v.detach().cpu() for k, v in self.soft_mask.state_dict().items()},
                    str(directory / SOFT_MASK_WEIGHTS),
                )
            torch.save(
                {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict()}, directory / "optimizer.pt"
            )
            state = {"step": self.step, "data": self.stream.state_dict(), "config": dataclasses.asdict(self.config)}
            (directory / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")

        path = write_checkpoint(self.run_dir / "checkpoints", self.step, write) if self.env.is_main else None
        barrier(self.env)
        return path

    def resume(self) -> bool:
        """Load the run directory's latest checkpoint, if any, and cut ``metrics.jsonl`` back to its step; True when
        one was loaded."""
        path = latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            return False
        state = json.loads((path / "trainer_state.json").read_text())
        for key in ("batch_size", "grad_accum", "seed", "sm_prob"):
            if state["config"][key] != getattr(self.config, key):
                raise ValueError(
                    f"cannot resume {path}: it was trained with {key}={state['config'][key]}, this run "
                    f"has {key}={getattr(self.config, key)}"
                )
        device = str(self.device)
        load_full_state(self.model, load_file(str(path / MODEL_WEIGHTS), device=device))
        self.ema.load_state_dict(load_file(str(path / EMA_WEIGHTS), device=device))
        if self.soft_mask is not None:
            self.soft_mask.load_state_dict(load_file(str(path / SOFT_MASK_WEIGHTS), device=device))
        # Parameters that never had a gradient (an SM parameter before the first SM batch) have no optimizer state,
        # and must stay without.
        opt = torch.load(path / "optimizer.pt", map_location="cpu" if self.sharded else device, weights_only=True)
        set_optimizer_state_dict(
            self.forward,
            self.optimizer,
            opt["optimizer"],
            options=StateDictOptions(full_state_dict=self.sharded, strict=False),
        )
        self.scheduler.load_state_dict(opt["scheduler"])
        self.stream.load_state_dict(state["data"])
        self.step = int(state["step"])
        if self.env.is_main:  # drop the log lines of steps after the checkpoint (they will be redone)
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        barrier(self.env)
        return True
