"""The paper's decoding claim in miniature: does soft-masking (SM) keep accuracy as more tokens are unmasked per step?

The task (:mod:`softmask_ext.data.parallel_task`): spell each word of a prompt with one of its two or three
spellings. One token per step resolves each word as soon as it starts it; several tokens per step can draw letters
of one word from different spellings, which is invalid. The metric is validity: the share of test prompts whose
every word is spelled with one of its spellings (and, per word, the share of words).

1. A small Dream-architecture model (:class:`softmask_ext.DreamModel`) is pretrained here with binary masking
   (MDLM noise ``t ~ U[1e-3, 1]``, all weights): the base model.
2. From the base, continued training with the library's trainer, each over ``--seeds``:

       binary             sm_prob = 0, S updates
       sm_same_updates    sm_prob = p, S updates (the two-pass recipe; SM starts at the paper's values)
       sm_same_compute    sm_prob = p, round(S / (1 + p)) updates: an SM batch's extra no-grad forward counted as a
                          whole step (an overestimate, so this condition is handicapped rather than favoured)
       binary_same_compute  sm_prob = 0, round(S / (1 + p)) updates: the control that tells SM at equal compute
                          apart from merely having fewer updates

   Runs with the same seed see the same data order and noise, so per-seed differences are paired.
3. Every model decodes the test prompts at 1, 2, 4, 8 and 16 tokens per step (the answer has 16 letters) with the
   paper's evaluation sampling (temperature 0.1, top-p 0.9, alg "entropy"), the same decoding seed for every model:
   binary models with binary decoding, SM models with SM decoding and their learned parameters.
4. The continued-training learning rate is chosen per family (binary, SM) on the validation split with a seed that is
   not an evaluation seed; test prompts are used for nothing else.

Writes ``reproduce_parallel.json`` and ``reproduce_parallel.png`` into ``--out``: validity against tokens per step
(mean, and every seed), SM minus binary per seed with 95% t-intervals over seeds (SM with the same updates and SM at
equal compute against binary, as the paper compares them, and SM at equal compute against the control), and each
seed's learned
``lam(negH)``; prints the table and the verdict. Every finished run's evaluation is cached in ``--work-dir`` (keyed
by its settings), so an interrupted reproduction continues where it stopped.

Full run: ``python experiments/reproduce_parallel.py``. Smoke test: ``--quick``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from softmask_ext.data.parallel_task import SpellingTask, TaskItem
from softmask_ext.decoding import diffusion_generate
from softmask_ext.model import DreamConfig, DreamModel
from softmask_ext.soft_mask import SoftMask
from softmask_ext.training import (
    FINETUNE_NOISE,
    PRETRAIN_NOISE,
    AdapterConfig,
    TrainConfig,
    Trainer,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the shared results harness
import harness

CONDITIONS = ("binary", "sm_same_updates", "sm_same_compute", "binary_same_compute")
SM_CONDITIONS = ("sm_same_updates", "sm_same_compute")
# (SM condition, binary condition) pairs compared seed by seed; the last separates SM from having fewer updates.
COMPARISONS = (("sm_same_updates", "binary"), ("sm_same_compute", "binary"), ("sm_same_compute", "binary_same_compute"))
TUNING_SEED = 1000  # the learning-rate search's training seed: not one of the evaluation seeds
DECODE_SEED = 0  # the same sampling noise for every model: differences between models are paired
# The paper's evaluation sampling for Dream (its code benchmarks).
DECODING = {"alg": "entropy", "temperature": 0.1, "top_p": 0.9}
QUICK = {
    "seeds": (0, 1, 2),
    "base_steps": 60,
    "steps": 8,
    "lr_grid": (1e-3,),
    "sm_lr_grid": (1e-1,),
    "train_size": 2048,
    "val_size": 32,
    "test_size": 64,
    "hidden_size": 32,
    "layers": 1,
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--seeds", type=_ints, default=(0, 1, 2, 3, 4), help="comma-separated training seeds (>= 2)")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the lexicon")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--base-steps", type=int, default=600, help="pretraining updates of the binary base model")
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=200, help="S: updates of the binary and same-updates runs")
    p.add_argument(
        "--lr-grid",
        type=_floats,
        default=(3e-4, 1e-3),
        help="continued-training learning rates; the best on validation is used, per family",
    )
    p.add_argument("--sm-prob", type=float, default=0.5, help="share of SM batches (the paper's Dream configs: 0.5)")
    p.add_argument(
        "--sm-lr-grid",
        type=_floats,
        default=(1e-2, 1e-1, 1.0),
        help="learning rates of the SM parameters (the paper's is 1e-2, over tens of thousands of updates); "
        "the best on validation is used",
    )
    p.add_argument("--k", type=int, default=1, help="top-k tokens blended by SM (the paper's coding models: 1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=20_000, help="training examples (drawn from train prompts)")
    p.add_argument("--val-size", type=int, default=256, help="validation prompts (learning-rate choice)")
    p.add_argument("--test-size", type=int, default=512, help="test prompts (the reported numbers)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads: the model is so small that a second thread mostly waits (and on a busy "
        "machine two threads waiting on each other make every op tens of times slower)",
    )
    p.add_argument("--work-dir", type=Path, default=Path("runs/reproduce_parallel"), help="training runs and cache")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where results go")
    p.add_argument(
        "--name",
        default=None,
        help="file name of the results (default reproduce_parallel, or reproduce_parallel_quick)",
    )
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK}")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if not 0 < args.sm_prob <= 1:
        p.error(f"--sm-prob must be in (0, 1], got {args.sm_prob}")
    if min(args.steps, args.base_steps) < 1 or len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds):
        p.error("need --steps >= 1, --base-steps >= 1 and at least two distinct seeds")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if TUNING_SEED in args.seeds:
        p.error(f"seed {TUNING_SEED} is the learning-rate search's seed; choose other evaluation seeds")
    return args


# ---------------------------------------------------------------------------------------------------- settings


def tokens_per_step(task: SpellingTask) -> tuple[int, ...]:
    """1, 2, 4, ... up to the whole answer in one step (powers of two that divide the answer length)."""
    return tuple(2**i for i in range(task.answer_length.bit_length()) if task.answer_length % 2**i == 0)


def condition_settings(args: argparse.Namespace, condition: str) -> tuple[float, int]:
    """(sm_prob, updates) of a condition."""
    fewer = max(1, round(args.steps / (1 + args.sm_prob)))
    return {
        "binary": (0.0, args.steps),
        "sm_same_updates": (args.sm_prob, args.steps),
        "sm_same_compute": (args.sm_prob, fewer),
        "binary_same_compute": (0.0, fewer),
    }[condition]


def model_config(args: argparse.Namespace, task: SpellingTask) -> DreamConfig:
    return DreamConfig(
        vocab_size=task.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=task.sequence_length,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        **task.token_ids,
    )


def _cached(path: Path, key: dict[str, Any]) -> Any:
    if path.exists() and (cached := json.loads(path.read_text()))["key"] == key:
        return cached["result"]
    return None


# ---------------------------------------------------------------------------------------------------- training


def train_base(args: argparse.Namespace, task: SpellingTask, train: list) -> Path:
    """The binary base model (cached in the work directory); returns its folder."""
    run_dir = args.work_dir / "base"
    key = {
        "task_seed": args.task_seed,
        "hidden": args.hidden_size,
        "layers": args.layers,
        "steps": args.base_steps,
        "lr": args.base_lr,
        "batch_size": args.batch_size,
        "train_size": args.train_size,
        "device": args.device,
    }
    if _cached(run_dir / "key.json", key) is not None:
        return run_dir / "final"
    torch.manual_seed(0)
    model = DreamModel(model_config(args, task))
    config = TrainConfig(
        run_dir=str(run_dir),
        max_steps=args.base_steps,
        batch_size=args.batch_size,
        lr=args.base_lr,
        weight_decay=0.01,
        warmup_ratio=0.05,
        clip=1.0,
        sm_prob=0.0,
        noise=PRETRAIN_NOISE,
        seed=0,
        adapter=AdapterConfig(kind="full"),
    )
    trainer = Trainer(model, train, config, device=args.device)
    for _ in range(args.base_steps):
        trainer.train_step()
    trainer.model.save_pretrained(run_dir / "final")
    (run_dir / "key.json").write_text(json.dumps({"key": key, "result": True}) + "\n")
    return run_dir / "final"


def continue_training(
    args: argparse.Namespace, train: list, base: Path, condition: str, seed: int, hyper: dict[str, float], run_dir: Path
) -> tuple[DreamModel, SoftMask | None]:
    """One condition's continued training from the base at ``hyper`` (``lr``, and ``sm_lr`` for SM); the SM
    parameters start at the paper's values."""
    sm_prob, steps = condition_settings(args, condition)
    model = DreamModel.from_pretrained(base, dtype=torch.float32)
    config = TrainConfig(
        run_dir=str(run_dir),
        max_steps=steps,
        batch_size=args.batch_size,
        lr=hyper["lr"],
        **({"sm_lr": hyper["sm_lr"]} if "sm_lr" in hyper else {}),
        weight_decay=0.0,
        warmup_ratio=0.03,
        clip=1.0,
        sm_prob=sm_prob,
        noise=FINETUNE_NOISE,
        seed=seed,
        adapter=AdapterConfig(kind="full"),
    )
    trainer = Trainer(model, train, config, soft_mask=SoftMask(k=args.k), device=args.device)
    for _ in range(steps):  # train_step alone: no checkpoints, final folder or figure for these short runs
        trainer.train_step()
    return trainer.model.eval(), (trainer.soft_mask.eval() if sm_prob > 0 else None)


# ---------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def validity(
    model: DreamModel, task: SpellingTask, items: list[TaskItem], tps: int, soft_mask: SoftMask | None
) -> dict[str, float]:
    """Decode every item's letters at ``tps`` tokens per step (``answer_length / tps`` steps, one batch); the share
    of valid answers and of validly spelled words."""
    device = model.get_input_embeddings().weight.device
    canvas = torch.tensor([task.sequence_ids(item.words) for item in items], device=device)
    out = diffusion_generate(
        model,
        canvas,
        max_new_tokens=0,
        steps=task.answer_length // tps,
        soft_mask=soft_mask,
        seed=DECODE_SEED,
        **DECODING,
    ).tolist()
    words = [task.word_validity(item.words, task.answer_tokens(row)) for item, row in zip(items, out)]
    return {
        "valid": statistics.fmean(all(w) for w in words),
        "word_valid": statistics.fmean(v for w in words for v in w),
    }


def evaluate(
    model: DreamModel, task: SpellingTask, items: list[TaskItem], soft_mask: SoftMask | None
) -> dict[str, dict[str, float]]:
    return {str(tps): validity(model, task, items, tps, soft_mask) for tps in tokens_per_step(task)}


def run_condition(
    args: argparse.Namespace,
    task: SpellingTask,
    train: list,
    base: Path,
    condition: str,
    seed: int,
    hyper: dict[str, float],
    items: list[TaskItem],
    split: str,
) -> dict[str, Any]:
    """Train one condition with one seed and evaluate it on ``items`` (cached by every setting it depends on)."""
    sm_prob, steps = condition_settings(args, condition)
    name = f"{split}-{condition}-seed{seed}-" + "-".join(f"{k}{v:g}" for k, v in sorted(hyper.items()))
    key = {
        "base": str(base.resolve()),
        "base_steps": args.base_steps,
        "condition": condition,
        "seed": seed,
        **hyper,
        "sm_prob": sm_prob,
        "steps": steps,
        "k": args.k,
        "batch_size": args.batch_size,
        "train_size": args.train_size,
        "items": len(items),
        "split": split,
        "decoding": DECODING,
        "device": args.device,
        "task_seed": args.task_seed,
    }
    cache = args.work_dir / f"{name}.eval.json"
    if (result := _cached(cache, key)) is not None:
        return result
    t0 = time.perf_counter()
    model, soft_mask = continue_training(args, train, base, condition, seed, hyper, args.work_dir / name)
    t1 = time.perf_counter()
    result = {
        "validity": evaluate(model, task, items, soft_mask),
        "soft_mask": soft_mask.to_transparency_config() if soft_mask is not None else None,
        "seconds": {"train": round(t1 - t0, 1), "evaluate": round(time.perf_counter() - t1, 1)},
    }
    cache.write_text(json.dumps({"key": key, "result": result}) + "\n")
    print(f"{name}: {result['seconds']}", flush=True)
    return result


def choose_hyperparameters(
    args: argparse.Namespace, task: SpellingTask, train: list, base: Path, val: list[TaskItem]
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """On the validation split, by mean validity over the tokens-per-step settings: the binary run's learning rate
    from ``--lr-grid``; then, at that same learning rate, the SM parameters' learning rate from ``--sm-lr-grid`` for
    SM with the same updates (used by both SM conditions). Both families thus differ only in SM."""

    def score(condition: str, hyper: dict[str, float]) -> float:
        result = run_condition(args, task, train, base, condition, TUNING_SEED, hyper, val, "validation")
        return statistics.fmean(v["valid"] for v in result["validity"].values())

    scores = {"binary lr": {f"{lr:g}": score("binary", {"lr": lr}) for lr in args.lr_grid}}
    lr = float(max(scores["binary lr"], key=scores["binary lr"].get))
    scores["sm_lr at that lr"] = {
        f"{sm_lr:g}": score("sm_same_updates", {"lr": lr, "sm_lr": sm_lr}) for sm_lr in args.sm_lr_grid
    }
    sm_lr = float(max(scores["sm_lr at that lr"], key=scores["sm_lr at that lr"].get))
    chosen = {
        "binary": {"lr": lr},
        "sm_same_updates": {"lr": lr, "sm_lr": sm_lr},
        "sm_same_compute": {"lr": lr, "sm_lr": sm_lr},
        "binary_same_compute": {"lr": lr},
    }
    return chosen, scores


# ---------------------------------------------------------------------------------------------------- statistics


@functools.cache
def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution (``0.5 < p < 1``): bisection on its CDF, integrated by Simpson's rule."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, n: int = 500) -> float:
        h = x / n
        pdf = [math.exp(log_norm - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        return 0.5 + h / 3 * (pdf[0] + pdf[-1] + 4 * sum(pdf[1:-1:2]) + 2 * sum(pdf[2:-1:2]))

    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_interval(values: list[float]) -> dict[str, Any]:
    """Mean with its 95% t-interval over the values (independent seeds)."""
    mean = statistics.fmean(values)
    half = t_quantile(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": [mean - half, mean + half], "per_seed": values}


def paired_differences(
    per_seed: dict[str, dict[int, dict]], tps_list: tuple[int, ...], seeds: tuple[int, ...]
) -> dict[str, dict[str, Any]]:
    """Per comparison ``"sm - binary"`` and tokens-per-step setting: the SM condition's validity minus the binary
    one's, seed by seed, with a 95% interval over seeds."""
    return {
        f"{sm} - {binary}": {
            str(t): mean_interval(
                [
                    per_seed[sm][s]["validity"][str(t)]["valid"] - per_seed[binary][s]["validity"][str(t)]["valid"]
                    for s in seeds
                ]
            )
            for t in tps_list
        }
        for sm, binary in COMPARISONS
    }


def verdicts(summary: dict, paired: dict, tps_list: tuple[int, ...], seeds: tuple[int, ...]) -> list[str]:
    """The task's two requirements and, per setting, whether SM beat binary, in plain words."""
    b = summary["binary"]
    first, at8 = b["1"]["valid"]["mean"], b[str(min(8, tps_list[-1]))]["valid"]["mean"]
    lines = [
        f"binary validity at 1 token/step: {first:.1%} (requirement >= 50%: {'met' if first >= 0.5 else 'NOT met'})",
        (
            f"binary validity from 1 to {min(8, tps_list[-1])} tokens/step: {first:.1%} -> {at8:.1%}, a fall of "
            f"{100 * (first - at8):.1f} points (requirement >= 10: {'met' if first - at8 >= 0.1 else 'NOT met'})"
        ),
    ]
    for comparison, by_tps in paired.items():
        for t in tps_list:
            d = by_tps[str(t)]
            lo, hi = d["ci95"]
            word = "SM better" if lo > 0 else "SM worse" if hi < 0 else "no difference detected"
            lines.append(
                f"{comparison}, {t} tokens/step: {100 * d['mean']:+.1f} points (95% interval over "
                f"{len(seeds)} seeds [{100 * lo:+.1f}, {100 * hi:+.1f}]): {word}"
            )
    return lines


def format_table(summary: dict, paired: dict, tps_list: tuple[int, ...]) -> str:
    head = "| condition | " + " | ".join(f"{t} tok/step" for t in tps_list) + " |"
    lines = [head, "|---" * (len(tps_list) + 1) + "|"]
    for condition, row in summary.items():
        cells = [
            f"{100 * row[str(t)]['valid']['mean']:.1f} [{100 * row[str(t)]['valid']['ci95'][0]:.1f}, "
            f"{100 * row[str(t)]['valid']['ci95'][1]:.1f}]"
            for t in tps_list
        ]
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    for comparison, by_tps in paired.items():
        cells = [
            f"{100 * by_tps[str(t)]['mean']:+.1f} [{100 * by_tps[str(t)]['ci95'][0]:+.1f}, "
            f"{100 * by_tps[str(t)]['ci95'][1]:+.1f}]"
            for t in tps_list
        ]
        lines.append(f"| {comparison} (paired) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    summary: dict,
    per_seed: dict,
    paired: dict,
    tps_list: tuple[int, ...],
    seeds: tuple[int, ...],
    path: Path,
    title: str,
) -> None:
    """Validity against tokens per step (mean and each seed), paired differences, and each seed's learned lam."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    colours = dict(zip(CONDITIONS, ("tab:blue", "tab:orange", "tab:green", "tab:gray")))
    xs = list(tps_list)
    for condition in CONDITIONS:
        colour = colours[condition]
        for s in seeds:
            axes[0].plot(
                xs, [per_seed[condition][s]["validity"][str(t)]["valid"] for t in xs], color=colour, alpha=0.25, lw=0.8
            )
        axes[0].plot(
            xs,
            [summary[condition][str(t)]["valid"]["mean"] for t in xs],
            color=colour,
            marker="o",
            label=f"{condition} (mean; thin: seeds)",
        )
    for offset, (sm, binary) in zip((-0.06, 0.0, 0.06), COMPARISONS):
        by_tps = paired[f"{sm} - {binary}"]
        means = [by_tps[str(t)]["mean"] for t in xs]
        errors = [
            [m - by_tps[str(t)]["ci95"][0] for m, t in zip(means, xs)],
            [by_tps[str(t)]["ci95"][1] - m for m, t in zip(means, xs)],
        ]
        axes[1].errorbar(
            [x * 2**offset for x in xs],
            means,
            yerr=errors,
            marker="o",
            capsize=3,
            color=colours[sm],
            ls="-" if binary == "binary" else ":",
            label=f"{sm} - {binary}",
        )
    axes[1].axhline(0.0, color="black", lw=0.8)
    neg_entropy = torch.linspace(-3.0, 0.0, 200)
    for condition, style in zip(SM_CONDITIONS, ("-", "--")):
        for s in seeds:
            sm = SoftMask.from_transparency_config(per_seed[condition][s]["soft_mask"])
            with torch.no_grad():
                axes[2].plot(
                    neg_entropy,
                    sm.lam(neg_entropy),
                    style,
                    color=colours[condition],
                    lw=1,
                    label=condition if s == seeds[0] else None,
                )
    for ax, ylabel in zip(axes[:2], ("validity (share of valid answers)", "SM - binary validity, 95% over seeds")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(t) for t in xs])
        ax.minorticks_off()
        ax.set_xlabel("tokens per step")
        ax.set_ylabel(ylabel)
    axes[2].set_xlabel("negative entropy of the previous prediction (nats)")
    axes[2].set_ylabel("learned lam (one line per seed)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    task = SpellingTask.generate(args.task_seed)
    tps_list = tokens_per_step(task)
    train = task.examples(task.sample("train", args.train_size, seed=0))
    val = task.sample("validation", args.val_size, seed=0)
    test = task.sample("test", args.test_size, seed=0)
    print(
        f"{len(train)} training examples, {len(val)} validation and {len(test)} test prompts; answers of "
        f"{task.answer_length} letters, decoded at {list(tps_list)} tokens per step",
        flush=True,
    )

    base = train_base(args, task, train)
    base_model = DreamModel.from_pretrained(base, dtype=torch.float32, device=args.device).eval()
    base_validity = {
        "validation": evaluate(base_model, task, val, None),
        "test": evaluate(base_model, task, test, None),
    }
    hypers, hyper_scores = choose_hyperparameters(args, task, train, base, val)
    print(f"chosen on validation: {hypers} (scores {hyper_scores})", flush=True)

    per_seed: dict[str, dict[int, dict]] = {c: {} for c in CONDITIONS}
    jobs = [(c, s) for s in args.seeds for c in CONDITIONS]
    for i, (condition, seed) in enumerate(jobs, 1):
        per_seed[condition][seed] = run_condition(
            args, task, train, base, condition, seed, hypers[condition], test, "test"
        )
        print(f"[{i}/{len(jobs)}] {condition} seed {seed} done", flush=True)

    summary = {
        c: {
            str(t): {
                m: mean_interval([per_seed[c][s]["validity"][str(t)][m] for s in args.seeds])
                for m in ("valid", "word_valid")
            }
            for t in tps_list
        }
        for c in CONDITIONS
    }
    paired = paired_differences(per_seed, tps_list, args.seeds)
    verdict = verdicts(summary, paired, tps_list, args.seeds)
    table = format_table(summary, paired, tps_list)
    report = {
        "task": {
            "lexicon_size": task.lexicon_size,
            "alphabet_size": task.alphabet_size,
            "word_length": task.word_length,
            "prompt_words": task.prompt_words,
            "spellings_per_word": [len(w) for w in task.spellings],
            "answer_length": task.answer_length,
            "task_seed": args.task_seed,
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "decoding": {**DECODING, "seed": DECODE_SEED, "tokens_per_step": list(tps_list)},
        "conditions": {c: dict(zip(("sm_prob", "updates"), condition_settings(args, c))) for c in CONDITIONS},
        "hyperparameters": {
            "chosen_on_validation": hypers,
            "validation_scores": hyper_scores,
            "tuning_seed": TUNING_SEED,
        },
        "base_model_validity": base_validity,
        "summary": summary,
        "paired_sm_minus_binary": paired,
        "learned_soft_mask": {c: {s: per_seed[c][s]["soft_mask"] for s in args.seeds} for c in SM_CONDITIONS},
        "per_seed_validity": {c: {s: per_seed[c][s]["validity"] for s in args.seeds} for c in CONDITIONS},
        "verdicts": verdict,
        "table_markdown": table,
        "seconds": round(time.perf_counter() - started, 1),
        "seconds_per_run": {c: {s: per_seed[c][s]["seconds"] for s in args.seeds} for c in CONDITIONS},
        "torch_threads": torch.get_num_threads(),
    }
    name = args.name or ("reproduce_parallel_quick" if args.quick else "reproduce_parallel")
    report = harness.write_results(args.out / f"{name}.json", report)
    plot(
        summary,
        per_seed,
        paired,
        tps_list,
        args.seeds,
        args.out / f"{name}.png",
        f"spelling task, {task.answer_length}-letter answers, {len(test)} test prompts: seeds {list(args.seeds)}",
    )
    print(table)
    print("\n".join(verdict))
    print(f"written: {args.out / (name + '.json')}, {args.out / (name + '.png')} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
