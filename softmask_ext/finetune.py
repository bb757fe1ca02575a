"""Soft-masking fine-tuning: ``python -m softmask_ext.finetune``.

With no arguments it adapts the tiny code model shipped in ``softmask_ext/assets/tiny-coder`` from binary masking to
soft-masking on the Python standard library's source (the held-out modules of
:mod:`softmask_ext.data.stdlib_corpus` for validation), on a CPU in a few minutes, and prints the validation loss
with and without SM and where everything was written.

For a real model: ``--model DIR`` (a Dream or LLaDA checkpoint) and ``--data FILE`` (JSONL / JSON / Parquet chat
``messages``, ``prompt``/``response``, or text). Hyper-parameters come from a preset, then from explicit flags:

* ``tiny`` (default for models under 1B parameters): full fine-tuning, the settings of the CPU demo (about a minute);
  the SM parameters start from the paper's values and learn at lr 0.3;
* ``dream-paper`` (default for larger models): the authors' Dream recipe as their trainer runs it: DoRA r=16 on
  q/k/v/o, lr 1e-5 cosine, clip 7, batch 1 x accumulation 8, sm_prob 0.5; per-sequence loss ``(1/t) x`` mean
  masked-token cross-entropy summed over the step, padding trained as response, the last message as the response,
  short responses and tool calls dropped, at most 300k samples, the best checkpoint by validation loss kept;
* ``dream-tokens``: the same optimisation with this library's per-token ELBO loss and data conventions.

The presets are defined, with the reasons for each value, in :mod:`softmask_ext.training.presets`.

Several GPUs: ``torchrun --nproc_per_node N -m softmask_ext.finetune ...``; ``--batch-size`` is per process, and the
run equals one process with N times the gradient accumulation. The model is replicated (DDP), or sharded with FSDP2
(each decoder layer, then the rest; the SM parameters stay replicated) when ``--fsdp`` is given or when its training
memory (weights, plus a gradient and two AdamW moments per trained weight) would exceed 80% of one GPU. Under FSDP,
checkpoints and the final model still hold full weights or PEFT adapters (written by rank 0) and ``--resume``
continues exactly; ``--fsdp`` in a single process is an error. With several processes the model is loaded on the CPU
and the trainer moves it, or its shards, to the GPUs.

Run folders (``--output-dir``/``--name``) hold one run each: an existing run is continued with ``--resume`` (from its
latest good checkpoint; by default one is written every 10% of the steps and every 30 minutes) or replaced with
``--overwrite``; anything else is refused before any work, and nothing is written. See docs/runs.md.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from .cli_errors import add_debug_flag, user_errors
from .cli_presets import PresetHelpFormatter, describe_preset_options
from .conventions import SHIPPED_MODEL, default_device
from .cpu_threads import configure_cpu_threads
from .data import load_dataset, split_off_validation, stdlib_dataset
from .model import load_model, load_tokenizer
from .model.family import load_config
from .model.file_checks import check_weight_files
from .training import AdapterConfig, NoiseSchedule, TrainConfig, Trainer, init_distributed
from .training.fsdp import check_fsdp_request
from .training.presets import FALLBACKS, PRESETS, drop_token_ids, gate_centre, initial_soft_mask
from .training.run_folder import check_free_space, check_run_folder, check_writable, clear_run_folder

LARGE_MODEL_PARAMS = 10**9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m softmask_ext.finetune",
        description=__doc__.split("\n\n")[0],
        formatter_class=PresetHelpFormatter,
    )
    p.add_argument(
        "--model", type=Path, default=SHIPPED_MODEL, help="checkpoint directory of any supported family (Dream, LLaDA)"
    )
    p.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=None,
        help="training data files or folders (default: the standard-library corpus)",
    )
    p.add_argument(
        "--val-data",
        type=Path,
        nargs="+",
        default=None,
        help="validation files (default: held-out stdlib modules, or --val-fraction of --data)",
    )
    p.add_argument("--output-dir", type=Path, default=Path("runs"))
    p.add_argument("--name", default=None, help="run name (default: <model folder>-sm)")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest good checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in the run folder")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="hyper-parameter preset (default: tiny below 1B parameters, dream-paper above)",
    )
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
    p.add_argument(
        "--sm-init-scale",
        type=float,
        help="initial transparency_scale (the paper's 0, stored as 1e-6, in both presets)",
    )
    p.add_argument(
        "--sm-init-centre",
        type=gate_centre,
        help="initial transparency_centre: a number < 0 (paper: -0.75) or 'auto', the median pass-1 "
        "negative entropy of the base model at masked positions of the first training batches",
    )
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-ratio", type=float)
    p.add_argument("--clip", type=float, help="gradient-norm clip")
    p.add_argument("--max-length", type=int, help="longest sequence (longer records are dropped)")
    p.add_argument("--max-samples", type=int, help="cap on the training examples (a seeded random subset)")
    p.add_argument(
        "--responses",
        choices=("all", "last"),
        help="chat data: every assistant turn is a response, or only the last message",
    )
    p.add_argument("--min-response-tokens", type=int, help="drop examples with fewer response tokens")
    p.add_argument(
        "--drop-tool-calls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="drop examples holding Qwen2's tool-call tokens (ids 151657, 151658)",
    )
    p.add_argument(
        "--loss",
        choices=("tokens", "sequence"),
        help="tokens: 1/t-weighted CE normalised by the step's response tokens; sequence: (1/t) x mean CE "
        "over each sequence's masked tokens, summed over the step (the authors' trainer)",
    )
    p.add_argument("--mask-eps", type=float, help="mask probability (1 - eps) t + eps (the authors': 1e-3)")
    p.add_argument(
        "--pad-as-response",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pad each batch to its longest + 0-49 tokens (a multiple of 8) and train on the padding",
    )
    p.add_argument("--t-min", type=float, help="noise level range, t ~ U[t-min, t-max]")
    p.add_argument("--t-max", type=float)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (GPU)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the model over the torchrun processes (FSDP2); chosen automatically when training "
        "would not fit one GPU",
    )
    p.add_argument(
        "--save-every",
        type=int,
        help="checkpoint every N steps (0: none by step count; default: every 10%% of the steps)",
    )
    p.add_argument("--save-minutes", type=float, help="checkpoint at least every M minutes (0: never by time)")
    p.add_argument(
        "--eval-every",
        type=int,
        help="validate every N steps and keep the best model as best/ beside final/ (0: at the end only)",
    )
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept on disk")
    p.add_argument("--val-fraction", type=float, help="share of --data held out when --val-data is not given")
    p.add_argument("--max-chars", type=int, default=None, help="cap on the size of the default stdlib corpus")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    add_debug_flag(p)
    describe_preset_options(p, PRESETS, FALLBACKS)
    args = p.parse_args(argv)
    for name in ("max_steps", "batch_size", "grad_accum", "k", "max_length", "eval_batches", "keep_checkpoints"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("save_every", "save_minutes", "eval_every"):
        value = getattr(args, name)
        if value is not None and value < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    return args


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


def load_data(args: argparse.Namespace, tokenizer: Any, settings: dict[str, Any]) -> tuple[Any, Any]:
    """(train, validation) examples: the stdlib corpus by default, else --data (and --val-data)."""
    max_length = settings["max_length"]
    if args.data is None:
        train, val = (
            stdlib_dataset(tokenizer, "train", max_length, args.max_chars),
            stdlib_dataset(tokenizer, "validation", max_length, args.max_chars),
        )
        return _cap(train, settings), val
    filters = dict(
        responses=settings["responses"],
        min_response_tokens=settings["min_response_tokens"],
        drop_token_ids=drop_token_ids(settings),
    )
    train = load_dataset(args.data, tokenizer, max_length, **filters)
    if args.val_data is not None:
        return _cap(train, settings), load_dataset(args.val_data, tokenizer, max_length, **filters)
    train, val = split_off_validation(train, settings["val_fraction"], settings["seed"])
    return _cap(train, settings), val


def _cap(train: Any, settings: dict[str, Any]) -> Any:
    """At most ``max_samples`` training examples: a random subset drawn from the run's seed."""
    cap = settings["max_samples"]
    if cap is not None and cap < 1:
        raise ValueError(f"--max-samples must be >= 1, got {cap}")
    if cap is None or cap >= len(train):
        return train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(settings["seed"]))[:cap]
    return [train[i] for i in sorted(order.tolist())]


def checkpoint_bytes(config: Any, settings: dict[str, Any]) -> int:
    """About the size of one checkpoint: the trained weights and two AdamW moments per weight, in fp32."""
    if settings["adapter"] == "full":
        trained = estimate_parameters(config)
    else:  # a rank-r adapter on the four attention projections of each layer
        trained = config.num_hidden_layers * settings["rank"] * 8 * config.hidden_size
    return 3 * 4 * trained


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the CLI; returns the run summary. Errors a user can fix exit with a message (a finished run asked to
    resume: status 0)."""
    args = parse_args(argv)
    configure_cpu_threads()
    with user_errors(args.debug):  # bad data, paths or settings, a full disk: a message, not a traceback
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune as ``args`` say; returns the run summary."""
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: no config.json there (expected a model checkpoint directory)")
    # Checks that need no model or data come first: a refused command writes nothing and wastes no time.
    run_dir = args.output_dir / (args.name or f"{args.model.resolve().name}-sm")
    check_run_folder(run_dir, resume=args.resume, overwrite=args.overwrite)
    check_writable(run_dir, "run folder")
    check_weight_files(args.model)
    device = torch.device(args.device) if args.device else default_device()
    env = init_distributed(device)
    check_fsdp_request(args.fsdp, env)
    if device.type == "cuda" and env.distributed:
        device = torch.device("cuda", env.local_rank)
    model_config = load_config(args.model)
    s = resolve_settings(args, model_config)
    if s["max_length"] > model_config.max_position_embeddings:
        raise ValueError(
            f"--max-length {s['max_length']} exceeds the {model_config.max_position_embeddings} "
            f"positions of {args.model} (max_position_embeddings in its config.json)"
        )
    if not args.resume:  # a resumed run already has its checkpoints on disk
        ckpt = checkpoint_bytes(model_config, s)
        check_free_space(
            run_dir,
            (s["keep_checkpoints"] + 1) * ckpt + ckpt // 3,
            f"{s['keep_checkpoints']} checkpoints (one more while the next is written) and the final model",
        )
    # Frozen bases are kept in bf16 (the adapters train in fp32 under autocast); trained weights stay fp32.
    dtype = torch.bfloat16 if s["bf16"] and device.type == "cuda" and s["adapter"] != "full" else torch.float32
    # Several processes: load on the CPU, so that a model FSDP will shard never has to fit one GPU whole.
    model = load_model(args.model, dtype=dtype, device="cpu" if env.distributed else device)
    tokenizer = load_tokenizer(args.model)
    train, val = load_data(args, tokenizer, s)
    world = env.world_size
    steps = s["max_steps"] or max(1, len(train) // (s["batch_size"] * s["grad_accum"] * world))
    config = TrainConfig(
        run_dir=str(run_dir),
        max_steps=steps,
        batch_size=s["batch_size"],
        grad_accum=s["grad_accum"],
        lr=s["lr"],
        sm_lr=s["sm_lr"],
        sm_eps=s["sm_eps"],
        weight_decay=s["weight_decay"],
        warmup_ratio=s["warmup_ratio"],
        clip=s["clip"],
        sm_prob=s["sm_prob"],
        noise=NoiseSchedule(s["t_min"], s["t_max"]),
        seed=s["seed"],
        adapter=AdapterConfig(kind=s["adapter"], rank=s["rank"], alpha=s["alpha"], dropout=s["lora_dropout"]),
        gradient_checkpointing=s["gradient_checkpointing"],
        bf16=s["bf16"],
        save_every=s["save_every"],
        save_interval_s=60 * s["save_minutes"],
        keep_checkpoints=s["keep_checkpoints"],
        eval_every=s["eval_every"],
        eval_batches=s["eval_batches"],
        fsdp=args.fsdp,
        loss=s["loss"],
        mask_eps=s["mask_eps"],
        pad_as_response=s["pad_as_response"],
    )
    soft_mask = initial_soft_mask(model, train, s, verbose=env.is_main)
    start = soft_mask.to_transparency_config()
    trainer = Trainer(
        model, train, config, val_data=val, soft_mask=soft_mask, tokenizer=tokenizer, device=device, env=env
    )
    if env.is_main:
        parallel = f", {'FSDP' if trainer.sharded else 'DDP'} over {world} processes" if env.distributed else ""
        print(
            f"fine-tuning {args.model} ({s['preset']} preset, {s['adapter']}{parallel}) on {len(train)} sequences "
            f"for {steps} steps; run directory {config.run_dir}"
        )
    if args.resume:
        trainer.resume()  # a checkpoint exists (checked above); a damaged latest one falls back with a warning
        if env.is_main:
            print(
                f"resuming from step {trainer.step} of {steps} (checkpoint {trainer.resumed_from}); the metrics of "
                "later steps were dropped and will be redone"
            )
    elif args.overwrite and env.is_main:
        clear_run_folder(run_dir)
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
        print(
            f"  {label + ':':14s}{value:.4f}   (perplexity bound {math.exp(value):.2f})"
            if value is not None
            else f"  {label + ':':14s}not evaluated (--sm-prob 0: a binary run)"
        )
    if summary.get("val_soft_mask") is not None:
        print(
            f"learned soft mask: scale {sm['transparency_scale']:.4g}, steepness {sm['transparency_steepness']:.4g}, "
            f"centre {sm['transparency_centre']:.4g} (k={sm['mixinputs_k']}); started at scale "
            f"{start['transparency_scale']:.4g}, steepness {start['transparency_steepness']:.4g}, centre "
            f"{start['transparency_centre']:.4g}"
        )
    print("written:")
    for key, path in summary["paths"].items():
        print(f"  {key:20s} {path}")
    print(
        json.dumps(
            {
                "val_binary": summary["val_binary"],
                "val_soft_mask": summary.get("val_soft_mask"),
                "transparency_scale": sm.get("transparency_scale"),
            }
        )
    )


if __name__ == "__main__":
    main()
