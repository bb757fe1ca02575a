"""MDLM training: binary pretraining and soft-masked (SM) continued pretraining of a DiT MDLM on packed text blocks.

One optimizer step takes a global batch of ``batch_size`` blocks, split over the ``torchrun`` processes (gradients
averaged as DDP does, so ``W`` processes give the result of one process with ``W`` times the accumulation steps) and
into ``grad_accum`` micro-batches per process. Times are MDLM's
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

from ..conventions import EMA_WEIGHTS, MODEL_WEIGHTS, SOFT_MASK_WEIGHTS
from ..data import BatchStream, Example
from ..diffusion.mdlm_objective import antithetic_times, mask_tokens, mdlm_nll
from ..diffusion.noise import stream_generator
from ..soft_mask import SoftMask
from .checkpoint import latest_checkpoint, write_checkpoint
from .distributed import DistEnv, all_reduce_sum, average_gradients, barrier
from .ema import EMA

__all__ = ["MDLM_PRESETS", "MDLMTrainConfig", "MDLMTrainer", "mdlm_preset"]

_TIME_STREAM, _MASK_STREAM, _COIN_STREAM, _DROPOUT_STREAM, _EVAL_STREAM = 11, 12, 13, 14, 15


@dataclass
class MDLMTrainConfig:
    """Hyper-parameters of an MDLM run (``batch_size`` is the global batch of one optimizer step over all processes,
    ``grad_accum`` the micro-batches of each process)."""

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
    data-parallel over ``torchrun`` processes (``env``; the model is replicated, rank 0 writes the files).

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
        device = model.get_input_embeddings().weight.device
        if soft_mask is None and config.sm_prob > 0:
            soft_mask = SoftMask(k=config.sm_k)
        self.soft_mask = soft_mask.to(device) if soft_mask is not None else None
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
    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns the step's loss (nats per token), the share of SM micro-batches, the lr."""
        cfg, model, env = self.config, self.model, self.env
        model.train()
        batch = next(self.stream)["input_ids"].to(model.get_input_embeddings().weight.device)  # this rank's slice
        # Times over the global batch; this rank's slice, as BatchStream slices the blocks.
        times = antithetic_times(cfg.batch_size, stream_generator(cfg.seed, _TIME_STREAM, self.step))
        times = times[env.rank * batch.shape[0] : (env.rank + 1) * batch.shape[0]]
        micro = batch.shape[0] // cfg.grad_accum
        total, soft_count = torch.zeros(()), 0
        self.optimizer.zero_grad(set_to_none=True)
        for a in range(cfg.grad_accum):
            # The micro-batch's index in one process with world_size * grad_accum micro-batches.
            index = (self.step * env.world_size + env.rank) * cfg.grad_accum + a
            x0, t = batch[a * micro : (a + 1) * micro], times[a * micro : (a + 1) * micro]
            torch.manual_seed(stream_generator(cfg.seed, _DROPOUT_STREAM, index).initial_seed() >> 1)  # dropout
            x_t = mask_tokens(x0, t, model.config.mask_token_id, stream_generator(cfg.seed, _MASK_STREAM, index))
            coin = torch.rand((), generator=stream_generator(cfg.seed, _COIN_STREAM, index)).item()
            soft = self.soft_mask is not None and coin < cfg.sm_prob
            soft_count += soft
            loss_sum, _ = mdlm_nll(model, x0, t, x_t, soft_mask=self.soft_mask if soft else None)
            (loss_sum / batch.numel()).backward()  # this process's mean; averaged over processes below
            total += loss_sum.detach().cpu()
        # Averaging the per-process means gives the mean over the global batch. SM parameters get gradients only on
        # steps where some process ran SM (elsewhere they stay without, as in one process).
        device = batch.device
        soft_total = all_reduce_sum(float(soft_count), env, device)
        average_gradients(model.parameters(), env)
        if self.soft_mask is not None and soft_total:
            average_gradients(self.soft_mask.parameters(), env)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(model)
        self.step += 1
        return {
            "step": self.step,
            "loss": all_reduce_sum(float(total), env, device) / (batch.numel() * env.world_size),
            "grad_norm": float(grad_norm),
            "sm_share": soft_total / (cfg.grad_accum * env.world_size),
            "lr": self.scheduler.get_last_lr()[0],
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation ELBO (nats per token) and its perplexity bound with the EMA weights, SM on when trained."""
        from ..evaluation.mdlm_metrics import elbo_perplexity

        with self.ema.averaged(self.model):
            return elbo_perplexity(
                self.model,
                self.validation,
                soft_mask=self.soft_mask,
                batch_size=self.config.batch_size // (self.config.grad_accum * self.env.world_size),
                max_batches=self.config.eval_batches,
                seed=self.config.seed,
            )

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
        if not main:
            return summary
        final = self.run_dir / "final"
        with self.ema.averaged(self.model):
            self.model.save_pretrained(final)
        if self.soft_mask is not None:
            self.soft_mask.save_transparency_config(final)
            summary["soft_mask"] = self.soft_mask.to_transparency_config()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Atomically write everything needed to continue exactly (rank 0 writes; returns its path there)."""

        def write(directory: Path) -> None:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                str(directory / MODEL_WEIGHTS),
            )
            save_file({k: v.cpu().contiguous() for k, v in self.ema.state_dict().items()}, str(directory / EMA_WEIGHTS))
            if self.soft_mask is not None:
                save_file(
                    {k: v.detach().cpu() for k, v in self.soft_mask.state_dict().items()},
                    str(directory / SOFT_MASK_WEIGHTS),
                )
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                directory / "optimizer.pt",
            )
            state = {"step": self.step, "data": self.stream.state_dict(), "config": dataclasses.asdict(self.config)}
            (directory / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")

        path = write_checkpoint(self.run_dir / "checkpoints", self.step, write) if self.env.is_main else None
        barrier(self.env)
        return path

    def resume(self) -> bool:
        """Load the run directory's latest checkpoint, if any; True when one was loaded."""
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
        device = self.model.get_input_embeddings().weight.device
        self.model.load_state_dict(load_file(str(path / MODEL_WEIGHTS), device=str(device)))
        self.ema.load_state_dict(load_file(str(path / EMA_WEIGHTS), device=str(device)))
        if self.soft_mask is not None:
            self.soft_mask.load_state_dict(load_file(str(path / SOFT_MASK_WEIGHTS), device=str(device)))
        opt = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        self.stream.load_state_dict(state["data"])
        self.step = int(state["step"])
        return True
