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
4. Every model also decodes the test prompts with confidence-threshold parallel decoding at each of ``--thresholds``
   (Fast-dLLM's rule: each step unmasks every letter whose confidence reaches the threshold, and the most confident
   one in any case), one block over the answer, the same sampling (temperature 0.1, top-p 0.9) and decoding seed; a
   step unmasks at least one letter, so a row is decoded within ``answer_length`` steps unless the model draws the
   mask token itself.
   The algorithm is "maskgit_plus" (confidence = probability of the drawn token, Fast-dLLM's): with "entropy" the
   confidence is a negative entropy, at most 0, so only the top position could pass a threshold in (0, 1]. Reported:
   validity against mean tokens per step (answer letters over the steps each prompt took until its answer held no
   mask).
5. The continued-training learning rate is chosen per family (binary, SM) on the validation split with a seed that is
   not an evaluation seed; test prompts are used for nothing else (the threshold sweep runs on the test split only).

Writes ``reproduce_parallel.json`` and ``reproduce_parallel.png`` into ``--out``: validity against tokens per step
(mean, and every seed), for fixed counts and for the threshold sweep (against mean tokens per step), SM minus binary
per seed with 95% t-intervals over seeds (SM with the same updates and SM at equal compute against binary, as the
paper compares them, and SM at equal compute against the control), and each seed's learned ``lam(negH)``; prints the
tables and the verdict. Every finished run's evaluation is cached in ``--work-dir`` (keyed
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
from softmask_ext.decoding import DecodeResult, diffusion_generate
from softmask_ext.evaluation.generation import steps_until_decoded
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
# Threshold decoding ranks by the drawn token's probability (Fast-dLLM's confidence): an entropy confidence is <= 0,
# so with "entropy" no position but the forced one could pass a threshold in (0, 1].
THRESHOLD_DECODING = {**DECODING, "alg": "maskgit_plus"}
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
    "thresholds": (0.5, 0.9),
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
    p.add_argument(
        "--thresholds",
        type=_floats,
        default=(0.3, 0.5, 0.7, 0.9, 0.99),
        help="confidence thresholds of the parallel-decoding sweep on the test split (each in (0, 1])",
    )
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
    if not all(0 < t <= 1 for t in args.thresholds) or len(set(args.thresholds)) != len(args.thresholds):
        p.error(f"--thresholds must be distinct, each in (0, 1], got {args.thresholds}")
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
def decode(
    model: DreamModel, task: SpellingTask, items: list[TaskItem], soft_mask: SoftMask | None, **settings: Any
) -> DecodeResult:
    """Decode every item's letters (masks in its prompt: ``max_new_tokens=0``) in one batch with the shared decoding
    seed; ``settings`` are further `diffusion_generate` keywords. ``.sequences``: int64 ``[B, sequence_length]``."""
    device = model.get_input_embeddings().weight.device
    canvas = torch.tensor([task.sequence_ids(item.words) for item in items], device=device)
    return diffusion_generate(
        model,
        canvas,
        max_new_tokens=0,
        soft_mask=soft_mask,
        seed=DECODE_SEED,
        return_dict_in_generate=True,
        **settings,
    )


def score(task: SpellingTask, items: list[TaskItem], sequences: torch.Tensor) -> dict[str, float]:
    """The share of valid answers and of validly spelled words among decoded ``sequences`` (``[B, T]``)."""
    words = [task.word_validity(item.words, task.answer_tokens(row)) for item, row in zip(items, sequences.tolist())]
    return {
        "valid": statistics.fmean(all(w) for w in words),
        "word_valid": statistics.fmean(v for w in words for v in w),
    }


def validity(
    model: DreamModel, task: SpellingTask, items: list[TaskItem], tps: int, soft_mask: SoftMask | None
) -> dict[str, float]:
    """Validity at ``tps`` tokens per step (``answer_length / tps`` steps)."""
    out = decode(model, task, items, soft_mask, steps=task.answer_length // tps, **DECODING)
    return score(task, items, out.sequences)


def threshold_validity(
    model: DreamModel, task: SpellingTask, items: list[TaskItem], threshold: float, soft_mask: SoftMask | None
) -> dict[str, float]:
    """Validity under confidence-threshold parallel decoding (one block; with a threshold ``steps`` only sets the
    block count), with ``tokens_per_step``: answer letters over the steps each item took until its answer held no
    mask (an item that never got there counts every step the batch ran)."""
    out = decode(
        model,
        task,
        items,
        soft_mask,
        steps=task.answer_length,
        threshold=threshold,
        output_history=True,
        **THRESHOLD_DECODING,
    )
    steps = steps_until_decoded(out.history, task.answer_positions, model.config.mask_token_id)
    return {**score(task, items, out.sequences), "tokens_per_step": task.answer_length * len(items) / sum(steps)}


def evaluate(
    model: DreamModel, task: SpellingTask, items: list[TaskItem], soft_mask: SoftMask | None
) -> dict[str, dict[str, float]]:
    return {str(tps): validity(model, task, items, tps, soft_mask) for tps in tokens_per_step(task)}


def evaluate_thresholds(
    model: DreamModel,
    task: SpellingTask,
    items: list[TaskItem],
    soft_mask: SoftMask | None,
    thresholds: tuple[float, ...],
) -> dict[str, dict[str, float]]:
    """Per threshold (its ``str``), :func:`threshold_validity`."""
    return {str(t): threshold_validity(model, task, items, t, soft_mask) for t in thresholds}


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
    thresholds: tuple[float, ...] = (),
) -> dict[str, Any]:
    """Train one condition with one seed and evaluate it on ``items``, at fixed tokens per step and at each of
    ``thresholds`` (cached by every setting it depends on)."""
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
        # Only runs with a sweep name it, so that the cached runs without one (validation) stay valid.
        **({"thresholds": list(thresholds), "threshold_decoding": THRESHOLD_DECODING} if thresholds else {}),
    }
    cache = args.work_dir / f"{name}.eval.json"
    if (result := _cached(cache, key)) is not None:
        return result
    t0 = time.perf_counter()
    model, soft_mask = continue_training(args, train, base, condition, seed, hyper, args.work_dir / name)
    t1 = time.perf_counter()
    fixed = evaluate(model, task, items, soft_mask)
    t2 = time.perf_counter()
    result = {
        "validity": fixed,
        "threshold": evaluate_thresholds(model, task, items, soft_mask, thresholds),
        "soft_mask": soft_mask.to_transparency_config() if soft_mask is not None else None,
        "seconds": {
            "train": round(t1 - t0, 1),
            "evaluate": round(t2 - t1, 1),
            "evaluate_threshold": round(time.perf_counter() - t2, 1),
        },
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


def summarise(
    per_seed: dict[str, dict[int, dict]],
    settings: tuple[float, ...],
    seeds: tuple[int, ...],
    sweep: str = "validity",
    metrics: tuple[str, ...] = ("valid", "word_valid"),
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per condition, setting of a sweep (``"validity"``: tokens per step; ``"threshold"``: thresholds) and metric:
    the mean over seeds with its 95% t-interval over seeds."""
    return {
        c: {
            str(t): {m: mean_interval([by_seed[s][sweep][str(t)][m] for s in seeds]) for m in metrics} for t in settings
        }
        for c, by_seed in per_seed.items()
    }


def paired_differences(
    per_seed: dict[str, dict[int, dict]],
    settings: tuple[float, ...],
    seeds: tuple[int, ...],
    sweep: str = "validity",
    metric: str = "valid",
) -> dict[str, dict[str, Any]]:
    """Per comparison ``"sm - binary"`` and setting of a sweep (as :func:`summarise`): the SM condition's ``metric``
    minus the binary one's, seed by seed, with a 95% interval over seeds."""
    return {
        f"{sm} - {binary}": {
            str(t): mean_interval(
                [per_seed[sm][s][sweep][str(t)][metric] - per_seed[binary][s][sweep][str(t)][metric] for s in seeds]
            )
            for t in settings
        }
        for sm, binary in COMPARISONS
    }


def direction(difference: dict[str, Any]) -> int:
    """+1 when a difference's 95% interval lies above zero, -1 when below, 0 when it contains zero."""
    lo, hi = difference["ci95"]
    return int(lo > 0) - int(hi < 0)


READING = {1: "SM better", -1: "SM worse", 0: "no difference detected"}


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
            lines.append(
                f"{comparison}, {t} tokens/step: {100 * d['mean']:+.1f} points (95% interval over "
                f"{len(seeds)} seeds [{100 * lo:+.1f}, {100 * hi:+.1f}]): {READING[direction(d)]}"
            )
    return lines


def threshold_verdicts(
    summary: dict, paired: dict[str, dict], thresholds: tuple[float, ...], seeds: tuple[int, ...]
) -> list[str]:
    """The binary models' validity against mean tokens per step over the threshold sweep; then, per comparison and
    threshold, whether SM beat binary: better (worse) when it is more (less) valid or decodes more (fewer) tokens
    per step, and not the opposite on the other ("mixed" when it is)."""
    b = summary["binary"]
    points = ", ".join(
        f"{b[str(t)]['valid']['mean']:.1%} at {b[str(t)]['tokens_per_step']['mean']:.2f} (threshold {t:g})"
        for t in sorted(thresholds, reverse=True)
    )
    lines = [f"binary validity at mean tokens/step under threshold decoding: {points}"]
    for comparison in paired["valid"]:
        for t in thresholds:
            valid, speed = paired["valid"][comparison][str(t)], paired["tokens_per_step"][comparison][str(t)]
            found = {direction(valid), direction(speed)} - {0}
            word = "mixed (one better, one worse)" if len(found) == 2 else READING[found.pop() if found else 0]
            lines.append(
                f"{comparison}, threshold {t:g}: {100 * valid['mean']:+.1f} points of validity "
                f"[{100 * valid['ci95'][0]:+.1f}, {100 * valid['ci95'][1]:+.1f}], {speed['mean']:+.2f} tokens/step "
                f"[{speed['ci95'][0]:+.2f}, {speed['ci95'][1]:+.2f}] (95% intervals over {len(seeds)} seeds): {word}"
            )
    return lines


def _cell(d: dict[str, Any], scale: float = 100.0, digits: int = 1, sign: str = "") -> str:
    """``mean [low, high]`` of a :func:`mean_interval`, times ``scale``; ``sign="+"`` for differences."""
    f = f"{sign}.{digits}f"
    return f"{scale * d['mean']:{f}} [{scale * d['ci95'][0]:{f}}, {scale * d['ci95'][1]:{f}}]"


def _markdown(columns: list[str], rows: dict[str, list[str]]) -> str:
    lines = ["| condition | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    return "\n".join(lines + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()])


def format_table(summary: dict, paired: dict, tps_list: tuple[int, ...]) -> str:
    """Validity in % per condition and tokens per step, then the paired differences in points."""
    rows = {c: [_cell(row[str(t)]["valid"]) for t in tps_list] for c, row in summary.items()}
    rows |= {f"{k} (paired)": [_cell(by_tps[str(t)], sign="+") for t in tps_list] for k, by_tps in paired.items()}
    return _markdown([f"{t} tok/step" for t in tps_list], rows)


def format_threshold_table(summary: dict, paired: dict[str, dict], thresholds: tuple[float, ...]) -> str:
    """Validity in % at mean tokens per step, per condition and threshold; then the paired differences of both."""

    def cell(valid: dict, speed: dict, sign: str = "") -> str:
        return f"{_cell(valid, sign=sign)} at {_cell(speed, 1.0, 2, sign)} tok/step"

    keys = [str(t) for t in thresholds]
    rows = {c: [cell(row[k]["valid"], row[k]["tokens_per_step"]) for k in keys] for c, row in summary.items()}
    rows |= {
        f"{comparison} (paired)": [
            cell(paired["valid"][comparison][k], paired["tokens_per_step"][comparison][k], "+") for k in keys
        ]
        for comparison in paired["valid"]
    }
    return _markdown([f"threshold {t:g}" for t in thresholds], rows)


def _curves(
    ax: Any,
    per_seed: dict,
    summary: dict,
    sweep: str,
    settings: tuple[float, ...],
    seeds: tuple[int, ...],
    colours: dict[str, str],
    x_metric: str | None = None,
) -> None:
    """Validity over a sweep's settings, per condition: each seed thin, the mean over seeds thick. The x value is the
    setting or, with ``x_metric``, that metric (each seed's own; the mean's is its mean over seeds)."""
    keys = [str(t) for t in settings]

    def line(points: list[dict[str, float]], **style: Any) -> None:
        xs = list(settings) if x_metric is None else [m[x_metric] for m in points]
        ax.plot(xs, [m["valid"] for m in points], **style)

    for condition in CONDITIONS:
        colour = colours[condition]
        for s in seeds:
            line([per_seed[condition][s][sweep][k] for k in keys], color=colour, alpha=0.25, lw=0.8)
        means = [{m: v["mean"] for m, v in summary[condition][k].items()} for k in keys]
        line(means, color=colour, marker="o", label=f"{condition} (mean; thin: seeds)")


def plot(
    summary: dict,
    threshold_summary: dict,
    per_seed: dict,
    paired: dict,
    tps_list: tuple[int, ...],
    thresholds: tuple[float, ...],
    seeds: tuple[int, ...],
    path: Path,
    title: str,
) -> None:
    """Validity against tokens per step (mean and each seed) at fixed counts and under the threshold sweep (against
    mean tokens per step), paired differences at fixed counts, and each seed's learned lam."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2), constrained_layout=True)
    colours = dict(zip(CONDITIONS, ("tab:blue", "tab:orange", "tab:green", "tab:gray")))
    xs = list(tps_list)
    _curves(axes[0], per_seed, summary, "validity", tps_list, seeds, colours)
    _curves(axes[1], per_seed, threshold_summary, "threshold", thresholds, seeds, colours, "tokens_per_step")
    for t in thresholds:  # which threshold each of the binary means is
        point = threshold_summary["binary"][str(t)]
        axes[1].annotate(
            f"{t:g}",
            (point["tokens_per_step"]["mean"], point["valid"]["mean"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    for offset, (sm, binary) in zip((-0.06, 0.0, 0.06), COMPARISONS):
        by_tps = paired[f"{sm} - {binary}"]
        means = [by_tps[str(t)]["mean"] for t in xs]
        errors = [
            [m - by_tps[str(t)]["ci95"][0] for m, t in zip(means, xs)],
            [by_tps[str(t)]["ci95"][1] - m for m, t in zip(means, xs)],
        ]
        axes[2].errorbar(
            [x * 2**offset for x in xs],
            means,
            yerr=errors,
            marker="o",
            capsize=3,
            color=colours[sm],
            ls="-" if binary == "binary" else ":",
            label=f"{sm} - {binary}",
        )
    axes[2].axhline(0.0, color="black", lw=0.8)
    neg_entropy = torch.linspace(-3.0, 0.0, 200)
    for condition, style in zip(SM_CONDITIONS, ("-", "--")):
        for s in seeds:
            sm = SoftMask.from_transparency_config(per_seed[condition][s]["soft_mask"])
            with torch.no_grad():
                axes[3].plot(
                    neg_entropy,
                    sm.lam(neg_entropy),
                    style,
                    color=colours[condition],
                    lw=1,
                    label=condition if s == seeds[0] else None,
                )
    labels = (
        ("tokens per step", "validity (share of valid answers)"),
        ("mean tokens per step, threshold decoding (labels: binary's thresholds)", "validity (share of valid answers)"),
        ("tokens per step", "SM - binary validity, 95% over seeds"),
    )
    for ax, (xlabel, ylabel) in zip(axes, labels):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(t) for t in xs])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    axes[3].set_xlabel("negative entropy of the previous prediction (nats)")
    axes[3].set_ylabel("learned lam (one line per seed)")
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
        f"{task.answer_length} letters, decoded at {list(tps_list)} tokens per step and at thresholds "
        f"{list(args.thresholds)}",
        flush=True,
    )

    base = train_base(args, task, train)
    base_model = DreamModel.from_pretrained(base, dtype=torch.float32, device=args.device).eval()
    base_validity = {
        "validation": evaluate(base_model, task, val, None),
        "test": evaluate(base_model, task, test, None),
        "test_threshold": evaluate_thresholds(base_model, task, test, None, args.thresholds),
    }
    hypers, hyper_scores = choose_hyperparameters(args, task, train, base, val)
    print(f"chosen on validation: {hypers} (scores {hyper_scores})", flush=True)

    per_seed: dict[str, dict[int, dict]] = {c: {} for c in CONDITIONS}
    jobs = [(c, s) for s in args.seeds for c in CONDITIONS]
    for i, (condition, seed) in enumerate(jobs, 1):
        per_seed[condition][seed] = run_condition(
            args, task, train, base, condition, seed, hypers[condition], test, "test", args.thresholds
        )
        print(f"[{i}/{len(jobs)}] {condition} seed {seed} done", flush=True)

    summary = summarise(per_seed, tps_list, args.seeds)
    paired = paired_differences(per_seed, tps_list, args.seeds)
    threshold_summary = summarise(
        per_seed, args.thresholds, args.seeds, "threshold", ("valid", "word_valid", "tokens_per_step")
    )
    threshold_paired = {
        m: paired_differences(per_seed, args.thresholds, args.seeds, "threshold", m)
        for m in ("valid", "tokens_per_step")
    }
    verdict = verdicts(summary, paired, tps_list, args.seeds) + threshold_verdicts(
        threshold_summary, threshold_paired, args.thresholds, args.seeds
    )
    table = (
        format_table(summary, paired, tps_list)
        + "\n\n"
        + format_threshold_table(threshold_summary, threshold_paired, args.thresholds)
    )
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
        "threshold_decoding": {
            **THRESHOLD_DECODING,
            "seed": DECODE_SEED,
            "thresholds": list(args.thresholds),
            "steps": task.answer_length,  # with a threshold it only sets the block count
        },
        "conditions": {c: dict(zip(("sm_prob", "updates"), condition_settings(args, c))) for c in CONDITIONS},
        "hyperparameters": {
            "chosen_on_validation": hypers,
            "validation_scores": hyper_scores,
            "tuning_seed": TUNING_SEED,
        },
        "base_model_validity": base_validity,
        "summary": summary,
        "paired_sm_minus_binary": paired,
        "threshold_summary": threshold_summary,
        "paired_sm_minus_binary_threshold": threshold_paired,
        "learned_soft_mask": {c: {s: per_seed[c][s]["soft_mask"] for s in args.seeds} for c in SM_CONDITIONS},
        "per_seed_validity": {c: {s: per_seed[c][s]["validity"] for s in args.seeds} for c in CONDITIONS},
        "per_seed_threshold": {c: {s: per_seed[c][s]["threshold"] for s in args.seeds} for c in CONDITIONS},
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
        threshold_summary,
        per_seed,
        paired,
        tps_list,
        args.thresholds,
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
