"""The training loop: binary or soft-masked (SM) masked-diffusion training, fine-tuning or from scratch.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` sequences on each of ``world_size`` processes. For
every micro-batch a coin with probability ``sm_prob`` picks the two-pass SM forward or one plain pass
(:mod:`softmask_ext.diffusion.two_pass`); the loss is :func:`softmask_ext.diffusion.objective.masked_token_loss`
normalised by the response tokens of the whole step (``loss="tokens"``), or the authors'
:func:`softmask_ext.diffusion.objective.sequence_mean_loss` with one ``t`` per sequence, summed over the step
(``loss="sequence"``); either way splitting a step into micro-batches or processes does not change the gradient.
Their trainer runs one sequence per micro-batch, so with ``batch_size > 1`` ``"sequence"`` still gives each sequence
its own ``t`` and its own term (the step equals the same sequences one per micro-batch).

Several processes (``torchrun``): DDP, or FSDP (:mod:`.fsdp`) when ``config.fsdp`` asks for it or the model would not
fit one GPU for training. Both give the result of one process with the same global batch.

Reproducibility. Randomness never comes from a shared, advancing RNG: the SM coin and the noise of micro-batch ``g`` are
drawn from generators seeded by ``(seed, stream, g)`` (:func:`softmask_ext.diffusion.noise.stream_generator`), the
global torch RNG (dropout) is reseeded from ``(seed, step, rank)`` at every step, and the data order is a function of
``(seed, epoch, position)`` (:class:`softmask_ext.data.BatchStream`). A checkpoint therefore only needs the weights, the
optimizer and scheduler state and the data position to continue exactly as the uninterrupted run.

Run directory (``run_dir``)::

    train_config.json        the configuration
    metrics.jsonl            one record per optimizer step (loss, lr, grad norm, SM parameters, share of SM batches;
                             validation losses with binary and soft masks on evaluation steps)
    checkpoints/             atomic checkpoints (:mod:`.checkpoint`) and the ``latest`` pointer: by default every
                             10% of the steps and at least every 30 minutes, the newest ``keep_checkpoints`` kept
    final/                   the trained model (full weights, or PEFT adapters) + tokenizer + transparency_config.json
    best/                    the same at the evaluation with the lowest validation loss (when ``eval_every`` > 0)
    transparency_config.json the learned SM parameters in the authors' format
    training.png             loss curves and the learned lam(negH)
    summary.json             final validation losses, time, and where everything is (written last: a run is
                             finished when it exists)

A run folder holds one run (:mod:`.run_folder`): :meth:`Trainer.train` refuses to start a run at step 0 in a folder
that already has metrics or checkpoints, and nothing is written before training starts (a refused resume leaves the
folder as it was).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..conventions import SOFT_MASK_WEIGHTS, RandomStream, default_device, pad_or_eos
from ..data import BatchStream, Example, collate
from ..diffusion.noise import FINETUNE_NOISE, NoiseSchedule, sample_noise, stream_generator
from ..diffusion.objective import masked_token_loss, sequence_mean_loss
from ..diffusion.two_pass import DiffusionTrainingForward
from ..environment import environment
from ..model.family import family_of
from ..soft_mask import SoftMask, binary_transparency_config, write_transparency_config
from .adapters import AdapterConfig, apply_adapters, load_trainable
from .checkpoint import checkpoint_name, latest_good_checkpoint, write_checkpoint
from .distributed import DistEnv, all_reduce_sum, average_gradients, barrier
from .fsdp import (
    FULL_STATE,
    ShardedTrainingForward,
    clip_grad_norm,
    gather_trainable_state,
    load_trainable_sharded,
    save_trainable_state,
    shard,
    use_fsdp,
)
from .plots import plot_training
from .run_folder import RunFolderError, read_metrics, truncate_metrics

__all__ = ["TrainConfig", "Trainer", "micro_batch_index"]

_EVAL_SEED = 0  # validation noise is the same for every run, so runs can be compared pairwise


def micro_batch_index(step: int, accum_index: int, grad_accum: int, rank: int, world_size: int) -> int:
    """Global index of micro-batch ``accum_index`` of optimizer step ``step`` on process ``rank``.

    With ``W`` processes and ``A`` accumulation steps this equals the index one process with ``W * A`` accumulation
    steps gives the same examples (BatchStream hands rank ``r`` the r-th slice of each global batch).
    """
    return (step * grad_accum + accum_index) * world_size + rank


@dataclass
class TrainConfig:
    """Hyper-parameters of a run. ``batch_size`` is per process and per micro-batch; ``fsdp`` shards the model over
    the processes (needs several; see :mod:`.fsdp` for when it is chosen without being asked).

    Checkpoints: every ``save_every`` steps (None: every 10% of ``max_steps``; 0: none by step count), at least every
    ``save_interval_s`` seconds (0: no time-based ones), and at the end; the newest ``keep_checkpoints`` are kept.
    """

    run_dir: str
    max_steps: int
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    sm_lr: float = 1e-2
    sm_eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    clip: float = 7.0
    sm_prob: float = 0.5
    noise: NoiseSchedule = FINETUNE_NOISE
    seed: int = 0
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    gradient_checkpointing: bool = False
    bf16: bool = False
    save_every: int | None = None
    save_interval_s: float = 1800.0
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_batches: int = 16
    fsdp: bool = False
    loss: str = "tokens"
    mask_eps: float = 0.0
    pad_as_response: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.noise, dict):
            self.noise = NoiseSchedule(**self.noise)
        if isinstance(self.adapter, dict):
            targets = self.adapter.get("targets")
            self.adapter = AdapterConfig(**{**self.adapter, "targets": None if targets is None else tuple(targets)})
        checks = {
            "max_steps >= 1": self.max_steps >= 1,
            "batch_size >= 1": self.batch_size >= 1,
            "grad_accum >= 1": self.grad_accum >= 1,
            "lr > 0": self.lr > 0,
            "sm_lr > 0": self.sm_lr > 0,
            "sm_eps > 0": self.sm_eps > 0,
            "weight_decay >= 0": self.weight_decay >= 0,
            "0 <= warmup_ratio < 1": 0 <= self.warmup_ratio < 1,
            "clip > 0": self.clip > 0,
            "0 <= sm_prob <= 1": 0 <= self.sm_prob <= 1,
            "save_every >= 0": self.save_every is None or self.save_every >= 0,
            "save_interval_s >= 0": self.save_interval_s >= 0,
            "keep_checkpoints >= 1": self.keep_checkpoints >= 1,
            "eval_every >= 0": self.eval_every >= 0,
            "eval_batches >= 1": self.eval_batches >= 1,
            "loss in (tokens, sequence)": self.loss in ("tokens", "sequence"),
            "0 <= mask_eps < 1": 0 <= self.mask_eps < 1,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid training configuration: need {', '.join(failed)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def checkpoint_every(self) -> int:
        """Steps between checkpoints by step count (0: none)."""
        return max(1, math.ceil(self.max_steps / 10)) if self.save_every is None else self.save_every


def _cosine_with_warmup(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Trainer:
    """Trains ``model`` (a DreamModel) with masked diffusion, binary or soft-masked.

    Args:
        model: the base model; wrapped in LoRA/DoRA adapters when ``config.adapter`` asks for them.
        train_data: examples (``input_ids`` + ``prompt_mask``), e.g. a :class:`softmask_ext.data.TokenizedDataset`.
        config: the run's hyper-parameters.
        val_data: optional validation examples, evaluated with binary and soft masks on the same noise.
        soft_mask: the SM parameters to train (default: the paper's initialisation, k = 1).
        tokenizer: saved next to the final model when given.
        device: where to train (default: CUDA when available).
        env: the process group (:func:`.distributed.init_distributed`); default: one process.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Sequence[Example],
        config: TrainConfig,
        *,
        val_data: Sequence[Example] | None = None,
        soft_mask: SoftMask | None = None,
        tokenizer: Any = None,
        device: torch.device | str | None = None,
        env: DistEnv | None = None,
    ) -> None:
        self.config = config
        self.env = env or DistEnv()
        self.device = torch.device(device) if device is not None else default_device()
        self.tokenizer = tokenizer
        self.val_data = val_data
        self.run_dir = Path(config.run_dir)
        self.model_config = model.config
        self.mask_token_id = int(model.config.mask_token_id)
        self.logit_shift = family_of(model).logit_shift
        self.pad_token_id = pad_or_eos(model.config)

        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        # Adapters start the same in every process (FSDP keeps each process's own shard of them).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = apply_adapters(model, config.adapter)
        # Decided before the model moves: a model sharded by FSDP goes to the device shard by shard.
        self.sharded = use_fsdp(config.fsdp, self.env, self.model, self.device)
        self.soft_mask = (soft_mask if soft_mask is not None else SoftMask(k=1)).to(self.device)
        self.soft_mask.requires_grad_(config.sm_prob > 0)
        if self.sharded:
            self.forward: DiffusionTrainingForward = ShardedTrainingForward(
                self.model, self.soft_mask, self.mask_token_id
            )
            shard(self.forward, self.env, self.device, bf16=self._bf16)
        else:
            self.model.to(self.device)
            self.forward = DiffusionTrainingForward(self.model, self.soft_mask, self.mask_token_id)
        self.ddp: nn.Module = self.forward
        if self.env.distributed and not self.sharded:
            device_ids = [self.device] if self.device.type == "cuda" else None
            # SM parameters get no gradient on plain-pass micro-batches: DDP must not wait for them.
            self.ddp = DistributedDataParallel(self.forward, device_ids=device_ids, find_unused_parameters=True)

        model_params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": model_params, "lr": config.lr, "weight_decay": config.weight_decay}]
        if config.sm_prob > 0:
            groups.append(
                {
                    "params": list(self.soft_mask.parameters()),
                    "lr": config.sm_lr,
                    "weight_decay": 0.0,
                    "eps": config.sm_eps,
                }
            )
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
        warmup = math.ceil(config.warmup_ratio * config.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _cosine_with_warmup(warmup, config.max_steps)
        )

        self.stream = BatchStream(
            train_data,
            config.batch_size * self.env.world_size,
            self.pad_token_id,
            seed=config.seed,
            pad_as_response=config.pad_as_response,
            rank=self.env.rank,
            world_size=self.env.world_size,
        )
        self.best: dict[str, float] | None = None  # step and validation loss of the model kept in best/
        self.step = 0
        self.soft_batches = 0
        self.micro_batches = 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.checkpoint_root = self.run_dir / "checkpoints"
        self.resumed_from: Path | None = None

    # ------------------------------------------------------------------------------------------------ the loss
    @property
    def _bf16(self) -> bool:
        return self.config.bf16 and self.device.type == "cuda"

    def _autocast(self):
        if self._bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _batch_loss(
        self,
        module: nn.Module,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
        soft: bool,
        num_tokens: float,
        per_sequence: bool = False,
        **forward_options: bool,
    ) -> torch.Tensor:
        """The micro-batch's loss: per-token (``num_tokens`` normalises it) or, with ``per_sequence``, the authors'
        per-sequence loss with their mask-probability floor."""
        ids = batch["input_ids"].to(self.device)
        response = ~batch["prompt_mask"].to(self.device)
        attention = batch["attention_mask"].to(self.device)
        mask_eps = self.config.mask_eps if per_sequence else 0.0
        noised = sample_noise(ids, response, self.mask_token_id, self.config.noise, generator, per_sequence, mask_eps)
        with self._autocast():
            logits = module(noised.x_t, None if bool(attention.all()) else attention, soft, **forward_options)
            if per_sequence:
                return sequence_mean_loss(logits, ids, noised.masked, noised.t, self.logit_shift)
            return masked_token_loss(logits, ids, noised.masked, noised.t, num_tokens, self.logit_shift)

    def _sm_coin(self, index: int) -> bool:
        if self.config.sm_prob == 0:
            return False
        u = torch.rand((), generator=stream_generator(self.config.seed, RandomStream.SM_COIN, index)).item()
        return u < self.config.sm_prob

    # ------------------------------------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """One optimizer step (all micro-batches of this process), which advances ``step`` (and with it the SM coins
        and the noise); returns its log record."""
        cfg, env = self.config, self.env
        self.ddp.train()
        torch.manual_seed(
            int(
                torch.randint(
                    2**62,
                    (),
                    generator=stream_generator(cfg.seed, RandomStream.TORCH_RNG, self.step * env.world_size + env.rank),
                )
            )
        )
        batches = [next(self.stream) for _ in range(cfg.grad_accum)]
        num_tokens = all_reduce_sum(sum(float((~b["prompt_mask"]).sum()) for b in batches), env, self.device)
        # The SM coin of every micro-batch of every process (FSDP keeps processes in lockstep with it).
        coins = [
            [
                self._sm_coin(micro_batch_index(self.step, a, cfg.grad_accum, r, env.world_size))
                for r in range(env.world_size)
            ]
            for a in range(cfg.grad_accum)
        ]
        loss_sum, soft_here = 0.0, 0
        for a, batch in enumerate(batches):
            index = micro_batch_index(self.step, a, cfg.grad_accum, env.rank, env.world_size)
            soft = coins[a][env.rank]
            soft_here += soft
            last = a == cfg.grad_accum - 1
            ddp = isinstance(self.ddp, DistributedDataParallel)
            sync = self.ddp.no_sync() if ddp and not last else contextlib.nullcontext()
            options = {"lockstep_pass1": any(coins[a])} if self.sharded else {}
            with sync:
                loss = self._batch_loss(
                    self.ddp,
                    batch,
                    stream_generator(cfg.seed, RandomStream.NOISE, index),
                    soft,
                    num_tokens,
                    cfg.loss == "sequence",
                    **options,
                )
                # DDP and FSDP average gradients over processes; the loss is already normalised over all of them
                # (tokens) or a sum over all of them (sequence).
                (loss * env.world_size).backward()
            loss_sum += loss.item()
        if self.sharded and any(map(any, coins)):  # the replicated SM parameters, as DDP would
            average_gradients(self.soft_mask.parameters(), env)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        clip = clip_grad_norm if self.sharded else torch.nn.utils.clip_grad_norm_
        grad_norm = clip(params, cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.soft_batches += int(all_reduce_sum(soft_here, env, self.device))
        self.micro_batches += cfg.grad_accum * env.world_size
        self.step += 1
        return {
            "loss": all_reduce_sum(loss_sum, env, self.device),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "sm_batches": soft_here,
            "sm_share": self.soft_batches / self.micro_batches,
            "tokens": num_tokens,
            **self.soft_mask_values(),
        }

    def soft_mask_values(self) -> dict[str, float]:
        cfg = self.soft_mask.to_transparency_config()
        return {
            "scale": cfg["transparency_scale"],
            "steepness": cfg["transparency_steepness"],
            "centre": cfg["transparency_centre"],
        }

    # ------------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (negative ELBO per response token) with binary masks and, when the run trains SM, with the
        two-pass SM forward, on identical noise (fixed seed) so the two numbers are directly comparable."""
        if not self.val_data:
            raise ValueError("no validation data was given")
        self.forward.eval()
        b, env = self.config.batch_size, self.env
        starts = list(range(0, min(len(self.val_data), b * self.config.eval_batches), b))
        modes = {"binary": False, "soft_mask": True} if self.config.sm_prob > 0 else {"binary": False}
        totals = dict.fromkeys(modes, 0.0)
        tokens = 0.0
        mine = starts[env.rank :: env.world_size]
        # Under FSDP every process runs as many forwards as the others (each all-gathers weights): a process with
        # fewer batches evaluates its first one again and discards the result.
        rounds = math.ceil(len(starts) / env.world_size) if self.sharded else len(mine)
        for r in range(rounds):
            counted = r < len(mine)
            j = mine[r] if counted else starts[0]
            batch = collate([self.val_data[i] for i in range(j, min(j + b, len(self.val_data)))], self.pad_token_id)
            tokens += float((~batch["prompt_mask"]).sum()) * counted
            for name, soft in modes.items():
                generator = stream_generator(_EVAL_SEED, RandomStream.VALIDATION, j)
                totals[name] += self._batch_loss(self.forward, batch, generator, soft, 1.0).item() * counted
        self.forward.train()
        tokens = all_reduce_sum(tokens, env, self.device)
        return {f"val_{name}": all_reduce_sum(total, env, self.device) / tokens for name, total in totals.items()}

    # ------------------------------------------------------------------------------------------------ the loop
    def train(self, stop_at_step: int | None = None) -> dict[str, Any]:
        """Train until ``config.max_steps`` (or until ``stop_at_step``, leaving a checkpoint to resume from).

        Returns the summary (also in ``summary.json`` once the run is complete).
        """
        cfg = self.config
        end = cfg.max_steps if stop_at_step is None else min(stop_at_step, cfg.max_steps)
        self._claim_run_dir()
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=f"training ({self.run_dir.name})",
            disable=not self.env.is_main,
            dynamic_ncols=True,
        )
        started = last_save = time.perf_counter()
        last_eval: dict[str, float] = {}
        every = cfg.checkpoint_every
        while self.step < end:
            record = self.train_step()
            record = {"step": self.step, **record, "elapsed_s": round(time.perf_counter() - started, 3)}
            if self.val_data and (self.step == cfg.max_steps or (cfg.eval_every and self.step % cfg.eval_every == 0)):
                last_eval = self.evaluate()
                record.update(last_eval)
                if cfg.eval_every:
                    self._keep_best(last_eval)
            self._log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", sm_scale=f"{record['scale']:.3g}")
            overdue = cfg.save_interval_s and time.perf_counter() - last_save >= cfg.save_interval_s
            if self.env.distributed:  # every process must take the same decision (rank clocks differ)
                overdue = all_reduce_sum(float(bool(overdue)), self.env, self.device) > 0
            if self.step == end or (every and self.step % every == 0) or overdue:
                self.save_checkpoint()
                last_save = time.perf_counter()
        bar.close()
        if self.step == cfg.max_steps and self.val_data and not last_eval:  # resumed at the last checkpoint
            last_eval = self.evaluate()
        summary = {"step": self.step, "train_seconds": round(time.perf_counter() - started, 1), **last_eval}
        summary["environment"] = environment(self.device)
        if self.best is not None:
            summary["best"] = self.best
        if self.step == cfg.max_steps:
            summary.update(self._finish(summary))
        return summary

    def _keep_best(self, evaluation: dict[str, float]) -> None:
        """Write the model to ``best/`` when its validation loss (with soft masks in an SM run, else binary) is the
        lowest so far (all ranks gather, rank 0 writes)."""
        loss = evaluation.get("val_soft_mask", evaluation["val_binary"])
        if self.best is not None and loss >= self.best["val_loss"]:
            return
        self.best = {"step": self.step, "val_loss": loss}
        model_state = gather_trainable_state(self.model) if self.sharded else None
        if self.env.is_main:
            best = self.run_dir / "best"
            self._save_model(best, model_state)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(best)
            write_transparency_config(best, self.trained_soft_mask)
            (best / "best.json").write_text(json.dumps(self.best, indent=2) + "\n")

    def _claim_run_dir(self) -> None:
        """Make the run folder this run's: refuse a fresh start over another run's files, then record the config."""
        if self.env.is_main:
            if self.step == 0 and (self.metrics_path.exists() or self.checkpoint_root.exists()):
                raise RunFolderError(
                    f"{self.run_dir} already holds a run (metrics or checkpoints); resume it, or "
                    "clear the folder to start afresh"
                )
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        barrier(self.env)

    def _log(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path)

    def _finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write the final model, the SM config, the figure and the summary (rank 0)."""
        paths: dict[str, str] = {}
        model_state = gather_trainable_state(self.model) if self.sharded else None
        if self.env.is_main:
            final = self.run_dir / "final"
            self._save_model(final, model_state)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(final)
            write_transparency_config(final, self.trained_soft_mask)
            paths = {
                "final_model": str(final),
                "transparency_config": write_transparency_config(self.run_dir, self.trained_soft_mask),
                "metrics": str(self.metrics_path),
                "figure": str(
                    plot_training(
                        self.records(), self.soft_mask, self.model_config.vocab_size, self.run_dir / "training.png"
                    )
                ),
                "checkpoints": str(self.checkpoint_root),
            }
            if self.best is not None:
                paths["best_model"] = str(self.run_dir / "best")
            out = {**summary, "soft_mask": self.transparency_config(), "paths": paths}
            (self.run_dir / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
        barrier(self.env)
        return {"soft_mask": self.transparency_config(), "paths": paths}

    @property
    def trained_soft_mask(self) -> SoftMask | None:
        """The SM parameters this run trains, or ``None`` for a binary run (``sm_prob == 0``)."""
        return self.soft_mask if self.config.sm_prob > 0 else None

    def transparency_config(self) -> dict[str, Any]:
        """What ``transparency_config.json`` holds for this run: the learned SM parameters, or for a binary run
        exactly ``{"transparency_alg": "none"}``, as the authors' trainer writes it."""
        sm = self.trained_soft_mask
        return binary_transparency_config() if sm is None else sm.to_transparency_config()

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Atomically write the state needed to continue exactly (all ranks gather, rank 0 writes, all ranks wait).

        Weights are written whole in the usual formats, and the optimizer state is keyed by parameter name
        (``torch.distributed.checkpoint.state_dict``), full and unsharded under FSDP.
        """
        model_state = gather_trainable_state(self.model) if self.sharded else None
        optimizer_state = get_optimizer_state_dict(
            self.forward, self.optimizer, options=FULL_STATE if self.sharded else None
        )
        if self.env.is_main:
            try:
                write_checkpoint(
                    self.checkpoint_root,
                    self.step,
                    lambda directory: self._write_state(directory, model_state, optimizer_state),
                    keep=self.config.keep_checkpoints,
                )
            except OSError as e:  # name the checkpoint (a full disk's error often names no file)
                raise OSError(e.errno, e.strerror, str(self.checkpoint_root / checkpoint_name(self.step))) from e
        barrier(self.env)

    def _save_model(self, directory: Path, model_state: dict[str, torch.Tensor] | None) -> None:
        """The trained model in the usual formats; under FSDP from the gathered full state (rank 0)."""
        if model_state is None:
            self.model.save_pretrained(directory)
        else:
            save_trainable_state(self.model, model_state, directory)

    def _write_state(
        self, directory: Path, model_state: dict[str, torch.Tensor] | None, optimizer_state: dict[str, Any]
    ) -> None:
        self._save_model(directory / "model", model_state)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.soft_mask.state_dict().items()},
            str(directory / SOFT_MASK_WEIGHTS),
        )
        write_transparency_config(directory / "transparency_config.json", self.trained_soft_mask)
        torch.save({"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict()}, directory / "optimizer.pt")
        state = {
            "step": self.step,
            "data": self.stream.state_dict(),
            "soft_batches": self.soft_batches,
            "micro_batches": self.micro_batches,
            "best": self.best,
            "config": self.config.to_dict(),
        }
        (directory / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")

    def resume(self) -> bool:
        """Load the latest good checkpoint of this run directory, if there is one; True when one was loaded.

        A checkpoint that fails verification is passed over for the previous one, with a warning on stderr.
        ``resumed_from`` names the checkpoint loaded.
        """
        path, skipped = latest_good_checkpoint(self.checkpoint_root)
        if self.env.is_main:
            for reason in skipped:
                print(f"warning: skipping a damaged checkpoint: {reason}", file=sys.stderr)
        if path is None:
            if skipped:
                raise RunFolderError(f"no usable checkpoint in {self.checkpoint_root}: every one is damaged")
            return False
        state = json.loads((path / "trainer_state.json").read_text())
        saved = state["config"]
        for key in ("batch_size", "grad_accum", "seed", "max_steps", "sm_prob"):
            if saved[key] != getattr(self.config, key):
                raise ValueError(
                    f"cannot resume {path}: it was trained with {key}={saved[key]}, this run has "
                    f"{key}={getattr(self.config, key)}"
                )
        (load_trainable_sharded if self.sharded else load_trainable)(self.model, self.config.adapter, path / "model")
        self.soft_mask.load_state_dict(load_file(str(path / SOFT_MASK_WEIGHTS), device=str(self.device)))
        # Under FSDP every process reads the full state on the CPU and keeps its shard. Parameters that never had a
        # gradient (an SM parameter before the first SM batch) have no state, and must stay without.
        opt = torch.load(path / "optimizer.pt", map_location="cpu" if self.sharded else self.device, weights_only=True)
        set_optimizer_state_dict(
            self.forward,
            self.optimizer,
            opt["optimizer"],
            options=StateDictOptions(full_state_dict=self.sharded, strict=False),
        )
        self.scheduler.load_state_dict(opt["scheduler"])
        self.stream.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.soft_batches, self.micro_batches = int(state["soft_batches"]), int(state["micro_batches"])
        self.best = state.get("best")
        if self.env.is_main:  # drop the log lines of steps after the checkpoint (they will be redone)
            truncate_metrics(self.metrics_path, self.step)
        barrier(self.env)
        self.resumed_from = path
        return True
