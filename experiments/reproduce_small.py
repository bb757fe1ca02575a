"""The paper's claims in miniature: does soft-masking (SM) beat binary masking on the shipped tiny code model?

From the shipped tiny base model (binary MDLM), continue training with the library's trainer under three conditions,
each over several seeds:

    binary             sm_prob = 0, S updates
    sm_same_updates    sm_prob = p, S updates
    sm_same_compute    sm_prob = p, round(S / (1 + p)) updates: the equal-compute budget, counting the extra
                       no-grad forward of an SM batch as a whole step (an overestimate, so this condition is
                       handicapped rather than favoured)

then evaluate every trained model on
    elbo    validation perplexity bound on the held-out stdlib modules: binary models with the plain forward, SM
            models with the two-pass SM forward (the paper's protocol); identical noise for every model, so
            per-seed differences are paired;
    infill  held-out functions with a hidden span, decoded at 1/2/4/8 tokens per step: binary models with binary
            decoding, SM models with SM decoding (their learned parameters).
With ``--ablations`` the SM-trained models are also evaluated without SM (plain forward, binary decoding).

Prints mean +- std over seeds, writes ``reproduce_small.json`` and ``reproduce_small.png`` into ``--out``, and states
whether the goals held: SM at least as good as binary on the ELBO, and better on infill at >= 2 tokens per
step by more than the seed-to-seed standard deviation.

Full run (defaults): ``python experiments/reproduce_small.py``. Smoke test: ``--quick``. Each finished run's
evaluation is cached in ``--work-dir`` (keyed by its settings), so an interrupted reproduction continues where it
stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softmask_ext.conventions import SHIPPED_MODEL
from softmask_ext.data import collate, heldout_functions, stdlib_dataset
from softmask_ext.evaluation import estimate_elbo, evaluate_infill, make_infill_examples, paired_difference, plot_infill
from softmask_ext.model import load_model, load_tokenizer
from softmask_ext.soft_mask import SoftMask
from softmask_ext.training import AdapterConfig, NoiseSchedule, TrainConfig, Trainer
from softmask_ext.training.presets import FALLBACKS, PRESETS, gate_centre, initial_soft_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the shared results harness
import harness

TINY = {**FALLBACKS, **PRESETS["tiny"]}
CONDITIONS = ("binary", "sm_same_updates", "sm_same_compute")
TOKENS_PER_STEP = (1, 2, 4, 8)
# Below this learned scale a soft mask differs from the plain mask embedding by < 0.1%: SM is off in effect.
INACTIVE_SCALE = 1e-3
QUICK = dict(
    seeds=(0, 1, 2),
    steps=3,
    batch_size=2,
    seq_len=64,
    max_chars=300_000,
    elbo_blocks=4,
    elbo_samples=2,
    infill_limit=4,
    spans_per_function=1,
    span_length=8,
)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="the base model (binary MDLM)")
    p.add_argument(
        "--seeds", type=_ints, default=(0, 1, 2, 3, 4), help="comma-separated training seeds (>= 3 for a std)"
    )
    p.add_argument(
        "--steps", type=int, default=TINY["max_steps"], help="S: updates of the binary and same-updates runs"
    )
    p.add_argument("--sm-prob", type=float, default=TINY["sm_prob"])
    p.add_argument("--batch-size", type=int, default=TINY["batch_size"])
    p.add_argument("--seq-len", type=int, default=TINY["max_length"], help="tokens per training/validation block")
    p.add_argument("--lr", type=float, default=TINY["lr"])
    p.add_argument("--sm-lr", type=float, default=TINY["sm_lr"])
    p.add_argument("--t-min", type=float, default=TINY["t_min"], help="training noise range")
    p.add_argument("--t-max", type=float, default=TINY["t_max"])
    p.add_argument("--k", type=int, default=TINY["k"], help="top-k tokens blended by SM")
    p.add_argument(
        "--sm-init-scale",
        type=float,
        default=TINY["sm_init_scale"],
        help="initial transparency_scale (the paper's 0 is stored as 1e-6)",
    )
    p.add_argument(
        "--sm-init-centre",
        type=gate_centre,
        default=TINY["sm_init_centre"],
        help="initial transparency_centre: a number < 0 (paper: -0.75) or 'auto' (the base model's median "
        "pass-1 confidence at masked positions)",
    )
    p.add_argument("--max-chars", type=int, default=None, help="cap on the training corpus (characters)")
    p.add_argument("--elbo-blocks", type=int, default=128, help="validation blocks for the ELBO")
    p.add_argument("--elbo-samples", type=int, default=8, help="noise draws per validation batch (stratified in t)")
    p.add_argument("--infill-limit", type=int, default=160, help="infill examples (spans) at most")
    p.add_argument("--spans-per-function", type=int, default=4, help="infill examples per held-out function")
    p.add_argument("--span-length", type=int, default=16)
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also evaluate the SM-trained models without SM (plain ELBO, binary decoding)",
    )
    p.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU (numbers then differ slightly)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/reproduce_small"), help="training runs and cache")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where results go")
    p.add_argument(
        "--name", default=None, help="file name of the results (default reproduce_small, or reproduce_small_quick)"
    )
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK}")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if not 0 < args.sm_prob <= 1:
        p.error(f"--sm-prob must be in (0, 1], got {args.sm_prob}")
    if args.steps < 1 or not args.seeds:
        p.error("need --steps >= 1 and at least one seed")
    if args.span_length % max(TOKENS_PER_STEP):
        p.error(f"--span-length must be a multiple of {max(TOKENS_PER_STEP)}")
    return args


def condition_settings(args: argparse.Namespace, condition: str) -> tuple[float, int]:
    """(sm_prob, updates) of a condition."""
    if condition == "binary":
        return 0.0, args.steps
    if condition == "sm_same_updates":
        return args.sm_prob, args.steps
    return args.sm_prob, max(1, round(args.steps / (1 + args.sm_prob)))


def train_one(args: argparse.Namespace, train_data: Any, condition: str, seed: int) -> tuple[nn.Module, SoftMask]:
    sm_prob, steps = condition_settings(args, condition)
    model = load_model(args.model, dtype=torch.float32)
    config = TrainConfig(
        run_dir=str(args.work_dir / f"{condition}-seed{seed}"),
        max_steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        sm_lr=args.sm_lr,
        weight_decay=TINY["weight_decay"],
        warmup_ratio=TINY["warmup_ratio"],
        clip=TINY["clip"],
        sm_prob=sm_prob,
        noise=NoiseSchedule(args.t_min, args.t_max),
        seed=seed,
        adapter=AdapterConfig(kind="full"),
    )
    soft_mask = initial_soft_mask(
        model,
        train_data,
        {
            **TINY,
            "k": args.k,
            "sm_init_scale": args.sm_init_scale,
            "sm_init_centre": args.sm_init_centre,
            "batch_size": args.batch_size,
            "t_min": args.t_min,
            "t_max": args.t_max,
            "seed": seed,
        },
        verbose=False,
    )
    trainer = Trainer(model, train_data, config, soft_mask=soft_mask, device=args.device)
    trainer.train()
    return trainer.model.eval(), trainer.soft_mask.eval()


def evaluate_model(
    args: argparse.Namespace,
    model: nn.Module,
    soft_mask: SoftMask | None,
    tokenizer: Any,
    val_batches: list,
    examples: list,
) -> dict[str, Any]:
    """ELBO and infill of one model: plain forward and binary decoding without SM parameters, the two-pass SM
    forward and SM decoding with them (and, with ``--ablations``, the plain/binary ones as well)."""
    mask_id = model.config.mask_token_id
    common = dict(num_samples=args.elbo_samples, seed=0, progress=False)
    elbo: dict[str, Any] = {}
    variants: dict[str, SoftMask | None] = {}
    if soft_mask is None or args.ablations:
        elbo["plain"] = estimate_elbo(model, val_batches, mask_id, **common).to_dict()
        variants["binary"] = None
    if soft_mask is not None:
        elbo["soft_mask"] = estimate_elbo(model, val_batches, mask_id, soft_mask=soft_mask, **common).to_dict()
        variants["soft_mask"] = soft_mask
    infill = evaluate_infill(
        model,
        tokenizer,
        examples,
        tokens_per_step=TOKENS_PER_STEP,
        soft_masks=variants,
        batch_size=16,
        progress=False,
        alg="entropy",
        temperature=0.0,
    )
    return {
        "elbo": elbo,
        "infill": infill,
        "soft_mask_config": soft_mask.to_transparency_config() if soft_mask is not None else None,
    }


def run_key(args: argparse.Namespace, condition: str, seed: int) -> dict[str, Any]:
    """Everything a cached result depends on."""
    sm_prob, steps = condition_settings(args, condition)
    return {
        "model": str(args.model.resolve()),
        "condition": condition,
        "seed": seed,
        "sm_prob": sm_prob,
        "steps": steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "sm_lr": args.sm_lr,
        "t": [args.t_min, args.t_max],
        "k": args.k,
        "sm_init": [args.sm_init_scale, args.sm_init_centre],
        "max_chars": args.max_chars,
        "elbo_blocks": args.elbo_blocks,
        "elbo_samples": args.elbo_samples,
        "infill_limit": args.infill_limit,
        "spans_per_function": args.spans_per_function,
        "span_length": args.span_length,
        "device": args.device,
        "ablations": args.ablations,
    }


def headline(condition: str, result: dict[str, Any]) -> dict[str, float]:
    """The numbers of one run that enter the table: the condition's own protocol (SM models with SM)."""
    own = "binary" if condition in ("base", "binary") else "soft_mask"
    elbo = result["elbo"]["plain" if own == "binary" else "soft_mask"]
    row = {"elbo_nll": elbo["nll_bound"], "elbo_ppl": elbo["perplexity_bound"]}
    for tps in TOKENS_PER_STEP:
        metrics = result["infill"][own][str(tps)]
        row[f"acc@{tps}"] = metrics["token_accuracy"]
        row[f"exact@{tps}"] = metrics["exact_match"]
        row[f"parse@{tps}"] = metrics["parse_rate"]
    if own == "soft_mask":
        row["sm_scale"] = result["soft_mask_config"]["transparency_scale"]
        if "plain" in result["elbo"]:  # --ablations: the SM-trained model without SM
            row["elbo_nll_plain_forward"] = result["elbo"]["plain"]["nll_bound"]
            for tps in TOKENS_PER_STEP:
                row[f"acc@{tps}_binary_decoding"] = result["infill"]["binary"][str(tps)]["token_accuracy"]
    return row


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdicts(summary: dict[str, dict[str, tuple[float, float]]], paired: dict[str, Any]) -> list[str]:
    """The two goals, checked on the measured numbers, in plain words."""
    lines = []
    b = summary["binary"]
    for condition in ("sm_same_updates", "sm_same_compute"):
        s = summary[condition]
        if s["sm_scale"][0] < INACTIVE_SCALE:
            lines.append(
                f"{condition}: the learned transparency_scale is {s['sm_scale'][0]:.3g}: soft masks stayed "
                "plain masks, so this run cannot show an effect of SM (see --sm-init-scale/--sm-init-centre)"
            )
        d, (lo, hi) = paired[condition]["elbo_difference_mean"], paired[condition]["elbo_difference_ci95_pooled"]
        better = "lower than" if hi < 0 else "higher than" if lo > 0 else "not distinguishable from"
        lines.append(
            f"{condition}: ELBO {s['elbo_nll'][0]:.4f} +- {s['elbo_nll'][1]:.4f} vs binary "
            f"{b['elbo_nll'][0]:.4f} +- {b['elbo_nll'][1]:.4f} nats/token; paired SM - binary = {d:+.4f} "
            f"(95% MC interval [{lo:+.4f}, {hi:+.4f}]): {better} binary; goal 'at least as good': "
            f"{'met' if d <= 0 or lo <= 0 else 'NOT met'}"
        )
        for tps in TOKENS_PER_STEP[1:]:
            key = f"acc@{tps}"
            gain = s[key][0] - b[key][0]
            noise = max(s[key][1], b[key][1])
            lines.append(
                f"{condition}: infill token accuracy at {tps} tokens/step {s[key][0]:.4f} +- {s[key][1]:.4f} "
                f"vs binary {b[key][0]:.4f} +- {b[key][1]:.4f}: gain {gain:+.4f} vs seed std {noise:.4f} "
                f"-> goal {'met' if gain > noise else 'NOT met'}"
            )
    return lines


def paired_elbo(results: dict[str, dict[int, dict]], seeds: tuple[int, ...]) -> dict[str, Any]:
    """Per seed, SM model (two-pass) minus binary model (plain) on identical noise; mean over seeds."""
    out = {}
    for condition in ("sm_same_updates", "sm_same_compute"):
        per_seed = [
            paired_difference(results[condition][s]["elbo"]["soft_mask"], results["binary"][s]["elbo"]["plain"])
            for s in seeds
        ]
        diffs = [p["difference"] for p in per_seed]
        halves = [(p["ci95"][1] - p["ci95"][0]) / 2 for p in per_seed]
        mean = statistics.fmean(diffs)
        half = math.sqrt(sum(h * h for h in halves)) / len(halves)  # MC interval of the mean of independent seeds
        out[condition] = {
            "per_seed": per_seed,
            "elbo_difference_mean": mean,
            "elbo_difference_std_over_seeds": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "elbo_difference_ci95_pooled": [mean - half, mean + half],
        }
    return out


def format_table(summary: dict[str, dict[str, tuple[float, float]]]) -> str:
    columns = ["elbo_nll", *(f"acc@{t}" for t in TOKENS_PER_STEP), "exact@8", "parse@8", "sm_scale"]
    lines = ["| condition | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for condition, row in summary.items():
        cells = [f"{row[c][0]:.4g} +- {row[c][1]:.2g}" if c in row else "" for c in columns]
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.model)
    print("preparing data ...", flush=True)
    train_data = stdlib_dataset(tokenizer, "train", args.seq_len, args.max_chars)
    val = stdlib_dataset(tokenizer, "validation", args.seq_len, args.max_chars)
    pad = tokenizer.pad_token_id
    val_examples = [val[i] for i in range(min(len(val), args.elbo_blocks))]
    val_batches = [collate(val_examples[i : i + 8], pad) for i in range(0, len(val_examples), 8)]
    examples = make_infill_examples(
        heldout_functions(),
        tokenizer,
        args.span_length,
        seed=0,
        limit=args.infill_limit,
        max_tokens=args.seq_len,
        spans_per_function=args.spans_per_function,
    )
    print(
        f"{len(train_data)} training blocks, {len(val_examples)} validation blocks, {len(examples)} infill spans "
        f"from {len({e.name for e in examples})} functions"
    )

    results: dict[str, dict[int, dict]] = {c: {} for c in ("base", *CONDITIONS)}
    jobs = [("base", args.seeds[0])] + [(c, s) for c in CONDITIONS for s in args.seeds]
    for i, (condition, seed) in enumerate(jobs, 1):
        cache = args.work_dir / f"{condition}-seed{seed}.eval.json"
        key = run_key(args, condition, seed)
        if cache.exists() and (cached := json.loads(cache.read_text()))["key"] == key:
            results[condition][seed] = cached["result"]
            print(f"[{i}/{len(jobs)}] {condition} seed {seed}: cached")
            continue
        t0 = time.perf_counter()
        if condition == "base":
            model = load_model(args.model, dtype=torch.float32, device=args.device).eval()
            soft_mask = None
        else:
            model, soft_mask = train_one(args, train_data, condition, seed)
            soft_mask = soft_mask if condition != "binary" else None
        t1 = time.perf_counter()
        result = evaluate_model(args, model, soft_mask, tokenizer, val_batches, examples)
        result["seconds"] = {"train": round(t1 - t0, 1), "evaluate": round(time.perf_counter() - t1, 1)}
        cache.write_text(json.dumps({"key": key, "result": result}) + "\n")
        results[condition][seed] = result
        print(f"[{i}/{len(jobs)}] {condition} seed {seed}: {result['seconds']}", flush=True)

    rows = {c: [headline(c, results[c][s]) for s in sorted(results[c])] for c in results}
    summary = {c: {k: mean_std([r[k] for r in rs]) for k in rs[0]} for c, rs in rows.items()}
    paired = paired_elbo(results, args.seeds)
    verdict = (
        verdicts(summary, paired)
        if len(args.seeds) >= 3
        else [f"only {len(args.seeds)} seed(s): no seed-to-seed standard deviation to judge the goals against"]
    )
    table = format_table(summary)
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "conditions": {c: dict(zip(("sm_prob", "updates"), condition_settings(args, c))) for c in CONDITIONS},
        "summary_mean_std": summary,
        "per_seed": rows,
        "paired_elbo_sm_minus_binary": paired,
        "verdicts": verdict,
        "table_markdown": table,
        "seconds": round(time.perf_counter() - started, 1),
        "seconds_per_run": {c: {s: r["seconds"] for s, r in by_seed.items()} for c, by_seed in results.items()},
        "torch_threads": torch.get_num_threads(),
    }
    name = args.name or ("reproduce_small_quick" if args.quick else "reproduce_small")
    report = harness.write_results(args.out / f"{name}.json", report)
    curves = {
        c: {
            str(t): {
                m: summary[c][f"{short}@{t}"]
                for m, short in (("token_accuracy", "acc"), ("exact_match", "exact"), ("parse_rate", "parse"))
            }
            for t in TOKENS_PER_STEP
        }
        for c in ("binary", "sm_same_updates", "sm_same_compute")
    }
    plot_infill(
        curves,
        str(args.out / f"{name}.png"),
        title=f"{args.model.resolve().name}, span of {args.span_length} tokens: mean +- std over seeds "
        f"{list(args.seeds)}",
    )
    print(table)
    print("\n".join(verdict))
    print(f"written: {args.out / (name + '.json')}, {args.out / (name + '.png')} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
