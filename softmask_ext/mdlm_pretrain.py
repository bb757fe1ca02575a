"""Train a DiT MDLM, binary or soft-masked, with the authors' recipes: ``python -m softmask_ext.pretrain --family
mdlm``.

``pretrain --family mdlm`` hands its other arguments to :func:`main`. A new DiT (``--hidden``, ``--blocks``,
``--heads``, ``--length``; by default MDLM's 169M OpenWebText shape) or an MDLM checkpoint to continue
(``--model DIR``) learns MDLM's objective on text packed into blocks of the model's length: ``--data`` files of text
records (``.txt``, or ``{"text": ...}`` in JSONL/JSON/Parquet), or by default the standard library's source
(:mod:`softmask_ext.data.stdlib_corpus`), with a held-out split for validation. The hyper-parameters are the
authors' recipe named by ``--preset`` (``mdlm-pretrain``: binary pretraining; ``mdlm-sm-paper``: soft-masked
continued pretraining, e.g. ``--model DIR --preset mdlm-sm-paper``), then explicit flags; ``--batch-size`` is the
global batch of one optimizer step.

The run folder ``--output`` follows ``finetune``'s rules (:mod:`softmask_ext.training.run_folder`): an occupied
folder is refused unless ``--resume`` (continue exactly from the newest checkpoint, with the settings recorded in
its ``train_config.json``) or ``--overwrite``. Its ``final/`` is an MDLM checkpoint in the public layout (EMA
weights, the tokenizer, ``transparency_config.json`` after an SM run) that ``generate`` and ``evaluate --task ppl``
take as ``--model``. Several processes: ``torchrun --nproc_per_node N -m softmask_ext.pretrain --family mdlm ...``
replicates the model (DDP), ``--fsdp`` shards it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from .cli_errors import add_debug_flag, user_errors
from .cli_presets import PresetHelpFormatter, describe_preset_options
from .conventions import SHIPPED_MODEL, default_device
from .cpu_threads import configure_cpu_threads
from .data import load_dataset, split_off_validation, stdlib_dataset
from .model import load_model, load_tokenizer
from .model.family import checkpoint_model_type
from .model.file_checks import check_weight_files
from .model.mdlm import MDLMConfig, MDLMModel, check_tokenizer
from .training import init_distributed
from .training.fsdp import check_fsdp_request
from .training.mdlm_trainer import MDLM_PRESETS, MDLMTrainConfig, MDLMTrainer, mdlm_preset
from .training.presets import FALLBACKS
from .training.run_folder import (
    RunFolderError,
    check_run_folder,
    check_writable,
    clear_run_folder,
)

__all__ = ["build_parser", "main", "parse_args", "run"]

PROG = "python -m softmask_ext.pretrain --family mdlm"
TRAIN_CONFIG = "train_config.json"
#: The DiT's shape options (``dest`` = the MDLMConfig field); they describe a new model only.
SIZE_FLAGS = {
    "hidden_dim": "--hidden",
    "n_blocks": "--blocks",
    "n_heads": "--heads",
    "model_length": "--length",
    "cond_dim": "--cond-dim",
    "dropout": "--dropout",
}
#: Settings a resumed command may change: they do not change the training (where to write, how to shard).
FREE_ON_RESUME = ("run_dir", "fsdp", "save_every")
#: Ends the documents of a bare ``tokenizers`` file (GPT-2's, and the shipped BPE's, end-of-text token).
END_OF_TEXT = "<|endoftext|>"
#: The values no preset sets, for ``--help``: MDLMTrainConfig's defaults and those of the DiT's shape (not
#: ``save_every``: this command checkpoints every 10% of the steps unless told).
_DEFAULTS = {
    f.name: f.default
    for f in (*dataclasses.fields(MDLMTrainConfig), *dataclasses.fields(MDLMConfig))
    if f.default is not dataclasses.MISSING and f.name != "save_every"
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=PresetHelpFormatter)
    p.add_argument(
        "--preset",
        choices=sorted(MDLM_PRESETS),
        default="mdlm-pretrain",
        help="the authors' recipe: binary pretraining, or soft-masked (SM) continued pretraining",
    )
    p.add_argument("--output", type=Path, help="run folder (default: runs/<preset>); the model goes to its final/")
    p.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in the run folder")
    model = p.add_argument_group("model", "a new DiT (MDLM's 169M shape unless given), or a checkpoint (--model)")
    model.add_argument("--model", type=Path, help="an MDLM checkpoint to continue (its shape is fixed)")
    model.add_argument("--hidden", dest="hidden_dim", type=int, metavar="N", help="width")
    model.add_argument("--blocks", dest="n_blocks", type=int, metavar="N", help="DiT blocks")
    model.add_argument("--heads", dest="n_heads", type=int, metavar="N", help="attention heads")
    model.add_argument("--length", dest="model_length", type=int, metavar="N", help="tokens per block and sample")
    model.add_argument("--cond-dim", dest="cond_dim", type=int, metavar="N", help="width of the adaLN conditioning")
    model.add_argument("--dropout", type=float, help="dropout rate of the DiT")
    model.add_argument(
        "--tokenizer",
        type=Path,
        help=f"a tokenizer folder or a `tokenizers` JSON file (default: the --model folder's own, else the shipped "
        f"BPE of {SHIPPED_MODEL.name}); a new DiT gets its vocabulary, with the mask appended when it has none",
    )
    data = p.add_argument_group("data", "text packed into blocks of the model's length")
    data.add_argument("--data", type=Path, nargs="+", help="text files or folders (default: the stdlib corpus)")
    data.add_argument(
        "--val-data",
        type=Path,
        nargs="+",
        help="validation text (default: the stdlib's held-out modules, or --val-fraction of --data)",
    )
    data.add_argument(
        "--val-fraction",
        type=float,
        default=FALLBACKS["val_fraction"],
        help="share of --data held out without --val-data",
    )
    data.add_argument("--max-chars", type=int, help="cap on the size of the default stdlib corpus")
    train = p.add_argument_group("training", "the preset's values unless given")
    train.add_argument("--max-steps", type=int, required=True, help="optimizer steps")
    train.add_argument("--batch-size", type=int, help="blocks per optimizer step, over all processes")
    train.add_argument("--grad-accum", type=int, help="micro-batches per process and step")
    train.add_argument("--lr", type=float, help="learning rate after the warm-up")
    train.add_argument("--sm-lr", type=float, help="learning rate of the SM parameters")
    train.add_argument("--sm-eps", type=float, help="AdamW epsilon of the SM parameters")
    train.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    train.add_argument("--warmup-steps", type=int, help="linear warm-up, then a constant learning rate")
    train.add_argument("--clip", type=float, help="gradient-norm clip")
    train.add_argument("--sm-prob", type=float, help="probability of the two-pass SM forward per micro-batch")
    train.add_argument("--k", dest="sm_k", type=int, metavar="K", help="top-k tokens blended into a masked position")
    train.add_argument("--ema", type=float, help="decay of the weights' moving average (what final/ holds)")
    train.add_argument("--seed", type=int, help="seed of the initial weights, the data order and the noise")
    train.add_argument("--eval-batches", type=int, help="validation batches at the end")
    train.add_argument(
        "--save-every", type=int, help="checkpoint every N steps (0: none; default: every 10%% of the steps)"
    )
    train.add_argument("--fsdp", action="store_true", help="shard the model over the torchrun processes (FSDP2)")
    train.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    add_debug_flag(p)
    describe_preset_options(p, MDLM_PRESETS, _DEFAULTS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    given = [flag for name, flag in SIZE_FLAGS.items() if getattr(args, name) is not None]
    if args.model is not None and given:
        p.error(f"{', '.join(given)} describe a new DiT; --model continues a checkpoint of its own shape")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the CLI; returns the run summary. Errors a user can fix exit with a one-line message."""
    args = parse_args(argv)
    configure_cpu_threads()
    with user_errors(args.debug):
        return run(args)


def training_config(args: argparse.Namespace, run_dir: Path) -> MDLMTrainConfig:
    """The preset with the explicit flags on top (checkpoints every 10% of the steps unless ``--save-every``)."""
    names = {f.name for f in dataclasses.fields(MDLMTrainConfig)} - {"run_dir", "max_steps", "save_every"}
    explicit = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    save_every = args.save_every if args.save_every is not None else max(1, args.max_steps // 10)
    return mdlm_preset(args.preset, run_dir=str(run_dir), max_steps=args.max_steps, save_every=save_every, **explicit)


def load_text_tokenizer(path: Path) -> Any:
    """A tokenizer folder (:func:`~softmask_ext.model.load_tokenizer`), or a bare ``tokenizers`` JSON file whose
    documents end with ``<|endoftext|>`` (it declares no special tokens; the mask is appended)."""
    if path.is_dir():
        return load_tokenizer(path)
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer {path}: no such folder or file")
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    if END_OF_TEXT not in tokenizer.get_vocab():
        raise ValueError(
            f"--tokenizer {path}: no {END_OF_TEXT} token to end documents with; give a tokenizer folder whose "
            "tokenizer_config.json names its eos_token"
        )
    tokenizer.eos_token = tokenizer.pad_token = END_OF_TEXT
    return tokenizer


def _default_tokenizer(model_dir: Path | None) -> Path:
    if model_dir is not None and any((model_dir / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        return model_dir
    return SHIPPED_MODEL


def build_model(args: argparse.Namespace, tokenizer: Any, seed: int, device: torch.device) -> MDLMModel:
    """A new DiT whose vocabulary is the tokenizer's (MDLM appends the mask when the tokenizer has none), or the
    ``--model`` checkpoint (fp32) after checking that the tokenizer fits it."""
    if args.model is None:
        sizes = {name: getattr(args, name) for name in SIZE_FLAGS if getattr(args, name) is not None}
        mask = tokenizer.mask_token_id
        config = MDLMConfig(
            vocab_size=len(tokenizer) + (mask is None),
            mask_token_id=mask,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sizes,
        )
        torch.manual_seed(seed)  # every process builds the same initial weights
        with torch.device(device):
            return MDLMModel(config)
    model_type = checkpoint_model_type(str(args.model))
    if model_type != "mdlm":
        raise ValueError(
            f"--model {args.model} is a {model_type} checkpoint; --family mdlm trains MDLM checkpoints "
            "(fine-tune the others with python -m softmask_ext.finetune)"
        )
    check_weight_files(args.model)
    model = load_model(args.model, dtype=torch.float32, device=device)
    problems = check_tokenizer(model.config, len(tokenizer))
    if tokenizer.mask_token_id not in (None, model.config.mask_token_id):
        problems.append(f"its mask is id {tokenizer.mask_token_id}, the model's {model.config.mask_token_id}")
    if problems:
        raise ValueError(
            f"the tokenizer does not fit --model {args.model}: {'; '.join(problems)}. Pass the model's own "
            "tokenizer with --tokenizer"
        )
    return model


def load_blocks(args: argparse.Namespace, tokenizer: Any, length: int, seed: int) -> tuple[Any, Any]:
    """(train, validation) blocks of ``length`` tokens: ``--data`` (or the stdlib's train modules) and ``--val-data``
    (or the stdlib's held-out modules, or ``--val-fraction`` of ``--data``)."""
    if args.data is None:
        train = stdlib_dataset(tokenizer, "train", length, args.max_chars)
    else:
        train = load_dataset(args.data, tokenizer, length, format="text")
    if args.val_data is not None:
        return train, load_dataset(args.val_data, tokenizer, length, format="text")
    if args.data is None:
        return train, stdlib_dataset(tokenizer, "validation", length, args.max_chars)
    return split_off_validation(train, args.val_fraction, seed)


def run_record(args: argparse.Namespace, model: MDLMModel, config: MDLMTrainConfig, tokenizer: Path) -> dict:
    """What ``train_config.json`` records: the model, the training settings and the data of the run."""

    def paths(items: list[Path] | None) -> list[str] | None:
        return None if items is None else [str(p.resolve()) for p in items]

    checkpoint = str(args.model.resolve()) if args.model is not None else None
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in FREE_ON_RESUME}
    data = {
        "data": paths(args.data),
        "val_data": paths(args.val_data),
        "val_fraction": args.val_fraction,
        "max_chars": args.max_chars,
        "tokenizer": str(tokenizer.resolve()),
    }
    record = {"model": {"checkpoint": checkpoint, **model.config.to_dict()}, "training": settings, "data": data}
    return json.loads(json.dumps(record))  # as it reads back


def check_same_run(run_dir: Path, record: dict) -> None:
    """``--resume`` must repeat the settings the run recorded (where it recorded them)."""
    path = run_dir / TRAIN_CONFIG
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    changed = [
        f"{key} ({saved.get(section, {}).get(key)!r} there, {value!r} now)"
        for section, values in record.items()
        for key, value in values.items()
        if saved.get(section, {}).get(key) != value
    ]
    if changed:
        raise RunFolderError(
            f"cannot resume {run_dir}: this command differs from its {TRAIN_CONFIG} in {', '.join(changed)}. "
            "Repeat the run's settings, or start afresh with --overwrite"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` say; returns the run summary."""
    # Checks that need no model or data come first: a refused command writes nothing and wastes no time.
    run_dir = args.output or Path("runs") / args.preset
    check_run_folder(run_dir, resume=args.resume, overwrite=args.overwrite, folder_options="--output")
    check_writable(run_dir, "run folder")
    device = torch.device(args.device) if args.device else default_device()
    env = init_distributed(device)
    check_fsdp_request(args.fsdp, env)
    if device.type == "cuda" and env.distributed:
        device = torch.device("cuda", env.local_rank)
    config = training_config(args, run_dir)
    tokenizer_path = args.tokenizer or _default_tokenizer(args.model)
    tokenizer = load_text_tokenizer(tokenizer_path)
    model = build_model(args, tokenizer, config.seed, device)
    record = run_record(args, model, config, tokenizer_path)
    if args.resume:
        check_same_run(run_dir, record)
    train, validation = load_blocks(args, tokenizer, model.config.model_length, config.seed)
    trainer = MDLMTrainer(model, config, train, validation, env=env)
    if env.is_main:
        if args.overwrite:
            clear_run_folder(run_dir)
        if not args.resume:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / TRAIN_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
        # The tokenizer goes into final/ first, so that a run that finishes holds a complete checkpoint there.
        tokenizer.save_pretrained(run_dir / "final")
        n_params = sum(p.numel() for p in model.parameters())
        source = args.model or f"a new {n_params / 1e6:.1f}M-parameter DiT"
        parallel = (
            f", {'FSDP' if trainer.sharded else 'DDP'} over {env.world_size} processes" if env.distributed else ""
        )
        print(
            f"training {source} ({args.preset}{parallel}) on {len(train)} blocks of {model.config.model_length} "
            f"tokens for {config.max_steps} steps; run folder {run_dir}" + (" (resuming)" if args.resume else "")
        )
    summary = trainer.train()
    if env.is_main:
        report(summary, run_dir)
    return summary


def report(summary: dict[str, Any], run_dir: Path) -> None:
    """Print the validation ELBO of the EMA weights, the learned SM parameters, and where the model went."""
    val = summary["validation"]
    sm = summary.get("soft_mask")
    print(
        f"validation ({val['tokens']} tokens, EMA weights{', SM' if sm else ''}): negative ELBO {val['nll']:.4f} "
        f"nats/token, perplexity bound {val['perplexity']:.2f}"
    )
    if sm:
        print(
            f"learned soft mask: scale {sm['transparency_scale']:.4g}, steepness {sm['transparency_steepness']:.4g}, "
            f"centre {sm['transparency_centre']:.4g} (k={sm['mixinputs_k']})"
        )
    print(f"model written to {run_dir / 'final'}")
