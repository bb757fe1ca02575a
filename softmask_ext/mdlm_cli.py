"""The command-line paths of MDLM-family checkpoints: ``generate`` (MDLM/ReMDM sampling) and ``evaluate --task
ppl|genppl|mauve``. The two CLIs parse their arguments and hand MDLM checkpoints to these functions."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .data import stdlib_dataset
from .decoding.mdlm_samplers import mdlm_generate
from .environment import environment
from .evaluation.mdlm_metrics import elbo_perplexity, generative_perplexity, mauve_score
from .model.mdlm import load_mdlm
from .model.tokenizer import load_tokenizer
from .soft_mask import CONFIG_FILENAME, SoftMask

__all__ = ["MDLM_TASKS", "evaluate_main", "generate_main"]

MDLM_TASKS = ("ppl", "genppl", "mauve")


def _soft_mask(option: str | None, model_dir: Path, binary: bool = False) -> SoftMask | None:
    """``--soft-mask FILE``; else the checkpoint's own ``transparency_config.json``; ``none``/``binary``: none."""
    if binary or (option is not None and option.lower() == "none"):
        return None
    if option is not None:
        return SoftMask.from_transparency_config(option)
    beside = model_dir / CONFIG_FILENAME
    return SoftMask.from_transparency_config(beside) if beside.is_file() else None


def _load(model_dir: Path, device: torch.device, dtype: torch.dtype | None):
    tokenizer = load_tokenizer(model_dir)
    model = load_mdlm(model_dir, dtype=dtype, device=device, tokenizer_size=len(tokenizer))
    return model, tokenizer


def generate_main(
    args: argparse.Namespace, model_dir: Path, device: torch.device, dtype: torch.dtype | None, prompt: str
) -> int:
    """Sample with MDLM's or ReMDM's sampler and print the text (``prompt`` "" samples unconditionally)."""
    try:
        model, tokenizer = _load(model_dir, device, dtype)
        soft_mask = _soft_mask(args.soft_mask, model_dir, args.binary)
        ids = tokenizer(prompt)["input_ids"] if prompt else []
        input_ids = torch.tensor([ids], dtype=torch.int64, device=device) if ids else None
        out = mdlm_generate(
            model,
            input_ids,
            max_new_tokens=args.max_new_tokens,
            steps=args.steps,
            sampler=args.sampler,
            eta=args.eta,
            nucleus_p=args.top_p if args.top_p is not None else 1.0,
            soft_mask=soft_mask,
            seed=args.seed,
        )
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None
    print(tokenizer.decode(out[0].tolist(), skip_special_tokens=True))
    return 0


def evaluate_main(args: argparse.Namespace) -> dict[str, Any]:
    """``ppl``: ELBO perplexity of held-out blocks (EMA weights are what ``final/`` holds; SM on when the checkpoint
    has a config); ``genppl``: generative perplexity of samples under ``--scorer``; ``mauve``: MAUVE of samples
    against held-out text (skipped with a message without ``mauve-text``)."""
    started = time.perf_counter()
    device = torch.device(args.device)
    try:
        model, tokenizer = _load(args.model, device, None)
        soft_mask = _soft_mask(args.soft_mask, args.model)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if soft_mask is not None:
        soft_mask = soft_mask.to(device)
    length = min(args.max_length, model.config.model_length)
    limit = args.limit or 64
    # Read only as many held-out modules as the blocks need (~8 characters per token leaves a margin).
    held_out = stdlib_dataset(tokenizer, "validation", length, max_chars=max(50_000, 8 * limit * length))
    blocks = [held_out[i] for i in range(min(len(held_out), limit))]
    if args.task == "ppl":
        results = elbo_perplexity(
            model,
            blocks,
            soft_mask=soft_mask,
            batch_size=args.batch_size,
            seed=args.seed,
            num_samples=args.num_samples or 4,
        )
    else:
        with torch.no_grad():
            ids = mdlm_generate(
                model,
                batch_size=args.samples,
                max_new_tokens=length,
                steps=args.steps or length,
                sampler=args.sampler,
                soft_mask=soft_mask,
                seed=args.seed,
            )
        texts = tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
        if args.task == "genppl":
            if args.scorer is None:
                raise SystemExit("error: --task genppl needs --scorer DIR (a local causal LM checkpoint)")
            results = generative_perplexity(texts, args.scorer, batch_size=args.batch_size, device=device)
        else:
            references = tokenizer.batch_decode([b.input_ids.tolist() for b in blocks], skip_special_tokens=True)
            results = mauve_score(texts, references, feature_model=args.feature_model)
            if "skipped" in results:
                print(results["skipped"], file=sys.stderr)
    report = {
        "task": args.task,
        "model": str(args.model),
        "sampler": args.sampler,
        "soft_mask": soft_mask.to_transparency_config() if soft_mask is not None else None,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
        "environment": environment(args.device, args.command),
    }
    out = args.out or Path("runs") / "eval" / args.model.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.task}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return report
