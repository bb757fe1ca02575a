"""Soft-masking fine-tuning: ``python -m softmask_ext.finetune``.

With no arguments it adapts the tiny code model shipped in ``softmask_ext/assets/tiny-coder`` from binary masking to
soft-masking on the Python standard library's source (the held-out modules of
:mod:`softmask_ext.data.stdlib_corpus` for validation), on a CPU in a few minutes, and prints the validation loss
with and without SM and where everything was written.

For a real model: ``--model DIR`` (a Dream or LLaDA checkpoint) and ``--data FILE`` (JSONL / JSON / Parquet chat
``messages``, ``prompt``/``response``, or text). Hyper-parameters come from a preset, then from explicit flags:

* ``tiny`` (default for models under 1B parameters): full fine-tuning, the settings of the CPU demo (about a minute);
  the SM parameters start from the paper's values and learn at lr 0.3 (see ``PRESETS``);
* ``dream-paper`` (default for larger models): the authors' Dream recipe: DoRA r=16, alpha=16, dropout 0 on
  q/k/v/o, lr 1e-5 cosine with 3% warmup, grad-norm clip 7, bf16, gradient checkpointing, batch 1 x accumulation
  8, max length 2048, sm_prob 0.5, SM parameters at lr 1e-2 from the paper's initialisation, one epoch.

Several GPUs: ``torchrun --nproc_per_node N -m softmask_ext.finetune ...``; ``--batch-size`` is per process, and the
run equals one process with N times the gradient accumulation. The model is replicated (DDP), or sharded with FSDP2
(each decoder layer, then the rest; the SM parameters stay replicated) when ``--fsdp`` is given or when its training
memory (weights, plus a gradient and two AdamW moments per trained weight) would exceed 80% of one GPU. Under FSDP,
checkpoints and the final model still hold full weights or PEFT adapters (written by rank 0) and ``--resume``
continues exactly; ``--fsdp`` in a single process is an error. With several processes the model is loaded on the CPU
and the trainer moves it, or its shards, to the GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from .conventions import SHIPPED_MODEL, default_device, pad_or_eos
from .data import DataFormatError, TokenizedDataset, load_dataset, stdlib_dataset
from .model import load_model, load_tokenizer
from .model.family import load_config
from .soft_mask import SoftMask
from .training import (AdapterConfig, NoiseSchedule, TrainConfig, Trainer, confidence_centre, init_distributed,
                       masked_neg_entropy)
from .training.fsdp import check_fsdp_request

LARGE_MODEL_PARAMS = 10**9

# `tiny` is the CPU demo on the shipped 1.4M-parameter model. It starts the SM parameters exactly as the paper does
# (scale ~1e-6, steepness 6.66, centre -0.75) and differs from the Dream recipe where the model and the run are
# small: full fine-tuning at lr 1e-4, short sequences, and an SM learning rate of 0.3 instead of 1e-2. Adam moves a
# raw (logit) parameter by at most about lr per update and the scale must travel about 13 logit units from 1e-6 to
# an active blend; the paper's Dream runs make tens of thousands of updates, this one about 300 SM updates under a
# cosine schedule.
# What it does to the shipped model: docs/results.md ("The paper's claims in miniature").
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(adapter="full", lr=1e-4, sm_lr=0.3, sm_init_scale=0.0, sm_init_centre=-0.75, warmup_ratio=0.03,
                 clip=1.0, bf16=False, gradient_checkpointing=False, batch_size=8, grad_accum=1, max_length=128,
                 sm_prob=0.5, k=1, max_steps=600, eval_batches=16),
    "dream-paper": dict(adapter="dora", rank=16, alpha=16.0, lora_dropout=0.0, lr=1e-5, sm_lr=1e-2,
                        sm_init_scale=0.0, sm_init_centre=-0.75, warmup_ratio=0.03, clip=7.0, bf16=True,
                        gradient_checkpointing=True, batch_size=1, grad_accum=8, max_length=2048, sm_prob=0.5, k=1,
                        max_steps=None, eval_batches=64),
}
FALLBACKS: dict[str, Any] = dict(sm_eps=1e-8, rank=16, alpha=16.0, lora_dropout=0.0, weight_decay=0.0, t_min=0.2,
                                 t_max=0.8, seed=0, save_every=0, eval_every=0, keep_checkpoints=2, val_fraction=0.02)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m softmask_ext.finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL,
                   help="checkpoint directory of any supported family (Dream, LLaDA)")
    p.add_argument("--data", type=Path, nargs="+", default=None,
                   help="training data files or folders (default: the standard-library corpus)")
    p.add_argument("--val-data", type=Path, nargs="+", default=None,
                   help="validation files (default: held-out stdlib modules, or --val-fraction of --data)")
    p.add_argument("--output-dir", type=Path, default=Path("runs"))
    p.add_argument("--name", default=None, help="run name (default: <model folder>-sm)")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="hyper-parameter preset (default: tiny below 1B parameters, dream-paper above)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--full", dest="adapter", action="store_const", const="full", help="train all weights")
    kind.add_argument("--lora", dest="adapter", action="store_const", const="lora", help="LoRA adapters")
    kind.add_argument("--dora", dest="adapter", action="store_const", const="dora", help="DoRA adapters")
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--sm-prob", type=float, help="probability of the two-pass SM forward per micro-batch")
    p.add_argument("--k", type=int, help="top-k tokens blended into a masked position")
    p.add_argument("--max-steps", type=int, help="optimizer steps (dream-paper default: one epoch)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch and process")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--sm-lr", type=float, help="learning rate of the SM parameters")
    p.add_argument("--sm-eps", type=float, help="AdamW epsilon of the SM parameters")
    p.add_argument("--sm-init-scale", type=float,
                   help="initial transparency_scale (the paper's 0, stored as 1e-6, in both presets)")
    p.add_argument("--sm-init-centre", type=gate_centre,
                   help="initial transparency_centre: a number < 0 (paper: -0.75) or 'auto', the median pass-1 "
                        "negative entropy of the base model at masked positions of the first training batches")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-ratio", type=float)
    p.add_argument("--clip", type=float, help="gradient-norm clip")
    p.add_argument("--max-length", type=int, help="longest sequence (longer records are dropped)")
    p.add_argument("--t-min", type=float, help="noise level range, t ~ U[t-min, t-max]")
    p.add_argument("--t-max", type=float)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (GPU)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--fsdp", action="store_true",
                   help="shard the model over the torchrun processes (FSDP2); chosen automatically when training "
                        "would not fit one GPU")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--eval-every", type=int, help="validate every N steps (0: at the end only)")
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--keep-checkpoints", type=int)
    p.add_argument("--val-fraction", type=float, help="share of --data held out when --val-data is not given")
    p.add_argument("--max-chars", type=int, default=None, help="cap on the size of the default stdlib corpus")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    return p.parse_args(argv)


def gate_centre(text: str) -> float | str:
    """``--sm-init-centre``: ``auto`` or a negative number."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a negative number, got {text!r}") from None
    if not value < 0:
        raise argparse.ArgumentTypeError(f"the gate centre is a negative entropy and must be < 0, got {value}")
    return value


def initial_soft_mask(model: torch.nn.Module, train: Any, settings: dict[str, Any], verbose: bool) -> SoftMask:
    """The SM parameters to start from; an ``auto`` centre is measured on the base model (rank-independent: every
    process sees the same first batches and noise)."""
    centre = settings["sm_init_centre"]
    if centre == "auto":
        neg_entropy = masked_neg_entropy(model, train, model.config.mask_token_id, pad_or_eos(model.config),
                                         NoiseSchedule(settings["t_min"], settings["t_max"]),
                                         batch_size=settings["batch_size"], seed=settings["seed"])
        centre = confidence_centre(neg_entropy)
        if verbose:
            q10, q90 = neg_entropy.quantile(torch.tensor([0.1, 0.9])).tolist()
            print(f"soft-mask gate centre {centre:.3f}: the median confidence (negative entropy, nats) of the base "
                  f"model at {neg_entropy.numel()} masked positions (10-90% range {q10:.2f} to {q90:.2f})")
    return SoftMask(k=settings["k"], scale=settings["sm_init_scale"], centre=centre)


def estimate_parameters(config: Any) -> int:
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    per_layer = 2 * h * config.num_attention_heads * config.head_dim + 2 * h * kv + 3 * h * i
    return layers * per_layer + 2 * config.vocab_size * h


def resolve_settings(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    """Explicit flags, else the preset, else the fallbacks."""
    preset = args.preset or ("dream-paper" if estimate_parameters(config) >= LARGE_MODEL_PARAMS else "tiny")
    settings = {**FALLBACKS, **PRESETS[preset], "preset": preset}
    for key, value in vars(args).items():
        if value is not None and key in settings:
            settings[key] = value
    return settings


def _split_off_validation(data: TokenizedDataset, fraction: float, seed: int) -> tuple[list, list]:
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {fraction}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(fraction * len(data)))
    if n_val >= len(data):
        raise DataFormatError(f"{len(data)} examples are too few to hold out a validation set; pass --val-data")
    return [data[i] for i in order[n_val:]], [data[i] for i in order[:n_val]]


def load_data(args: argparse.Namespace, tokenizer: Any, settings: dict[str, Any]) -> tuple[Any, Any]:
    """(train, validation) examples: the stdlib corpus by default, else --data (and --val-data)."""
    max_length = settings["max_length"]
    if args.data is None:
        return (stdlib_dataset(tokenizer, "train", max_length, args.max_chars),
                stdlib_dataset(tokenizer, "validation", max_length, args.max_chars))
    train = load_dataset(args.data, tokenizer, max_length)
    if args.val_data is not None:
        return train, load_dataset(args.val_data, tokenizer, max_length)
    return _split_off_validation(train, settings["val_fraction"], settings["seed"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:  # bad data, paths or settings: a message, not a traceback
        raise SystemExit(f"error: {e}") from e


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune as ``args`` say; returns the run summary."""
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: no config.json there (expected a model checkpoint directory)")
    device = torch.device(args.device) if args.device else default_device()
    env = init_distributed(device)
    check_fsdp_request(args.fsdp, env)
    if device.type == "cuda" and env.distributed:
        device = torch.device("cuda", env.local_rank)
    model_config = load_config(args.model)
    s = resolve_settings(args, model_config)
    # Frozen bases are kept in bf16 (the adapters train in fp32 under autocast); trained weights stay fp32.
    dtype = torch.bfloat16 if s["bf16"] and device.type == "cuda" and s["adapter"] != "full" else torch.float32
    # Several processes: load on the CPU, so that a model FSDP will shard never has to fit one GPU whole.
    model = load_model(args.model, dtype=dtype, device="cpu" if env.distributed else device)
    tokenizer = load_tokenizer(args.model)
    train, val = load_data(args, tokenizer, s)
    world = env.world_size
    steps = s["max_steps"] or max(1, len(train) // (s["batch_size"] * s["grad_accum"] * world))
    name = args.name or f"{args.model.resolve().name}-sm"
    config = TrainConfig(
        run_dir=str(args.output_dir / name), max_steps=steps, batch_size=s["batch_size"], grad_accum=s["grad_accum"],
        lr=s["lr"], sm_lr=s["sm_lr"], sm_eps=s["sm_eps"], weight_decay=s["weight_decay"],
        warmup_ratio=s["warmup_ratio"], clip=s["clip"], sm_prob=s["sm_prob"], noise=NoiseSchedule(s["t_min"], s["t_max"]), seed=s["seed"],
        adapter=AdapterConfig(kind=s["adapter"], rank=s["rank"], alpha=s["alpha"], dropout=s["lora_dropout"]),
        gradient_checkpointing=s["gradient_checkpointing"], bf16=s["bf16"], save_every=s["save_every"],
        keep_checkpoints=s["keep_checkpoints"], eval_every=s["eval_every"], eval_batches=s["eval_batches"],
        fsdp=args.fsdp,
    )
    soft_mask = initial_soft_mask(model, train, s, verbose=env.is_main)
    start = soft_mask.to_transparency_config()
    trainer = Trainer(model, train, config, val_data=val, soft_mask=soft_mask, tokenizer=tokenizer,
                      device=device, env=env)
    if env.is_main:
        parallel = f", {'FSDP' if trainer.sharded else 'DDP'} over {world} processes" if env.distributed else ""
        print(f"fine-tuning {args.model} ({s['preset']} preset, {s['adapter']}{parallel}) on {len(train)} sequences "
              f"for {steps} steps; run directory {config.run_dir}")
    if args.resume and trainer.resume() and env.is_main:
        print(f"resumed from step {trainer.step}")
    summary = trainer.train()
    if env.is_main:
        report(summary, start)
    return summary


def report(summary: dict[str, Any], start: dict[str, Any]) -> None:
    """Print the validation losses, the learned SM parameters against their start, and where the run went."""
    sm = summary["soft_mask"]
    losses = {"binary masks": summary["val_binary"], "soft masks": summary.get("val_soft_mask")}
    print("\nvalidation loss (negative ELBO per response token, nats; same noise for both):")
    for label, value in losses.items():
        print(f"  {label + ':':14s}{value:.4f}   (perplexity bound {math.exp(value):.2f})" if value is not None
              else f"  {label + ':':14s}not evaluated (--sm-prob 0: a binary run)")
    if summary.get("val_soft_mask") is not None:
        print(f"learned soft mask: scale {sm['transparency_scale']:.4g}, steepness {sm['transparency_steepness']:.4g}, "
              f"centre {sm['transparency_centre']:.4g} (k={sm['mixinputs_k']}); started at scale "
              f"{start['transparency_scale']:.4g}, steepness {start['transparency_steepness']:.4g}, centre "
              f"{start['transparency_centre']:.4g}")
    print("written:")
    for key, path in summary["paths"].items():
        print(f"  {key:20s} {path}")
    print(json.dumps({"val_binary": summary["val_binary"], "val_soft_mask": summary.get("val_soft_mask"),
                      "transparency_scale": sm["transparency_scale"]}))


if __name__ == "__main__":
    main()
