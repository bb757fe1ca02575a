"""Code infilling on held-out functions, decoded at several tokens per step.

Each example is a top-level function of a held-out standard-library module
(:func:`softmask_ext.data.heldout_functions`), tokenised, with a span of ``L`` tokens hidden in its code body
(after the signature and the docstring). The engine decodes the span between the tokens before and after it
(:func:`.generation.infill_tokens`) in ``L / tokens_per_step`` steps: decoding more tokens per step is where
soft-masking is claimed to help (the SM paper, arXiv 2510.17206).

Metrics per setting: token accuracy (share of span tokens right), exact match (share of spans entirely right) and
parse rate (share of rebuilt functions that ``ast.parse`` accepts).
"""

from __future__ import annotations

import ast
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from ..conventions import pad_or_eos
from ..data.stdlib_corpus import FunctionSource
from .generation import infill_tokens

__all__ = [
    "InfillExample",
    "evaluate_infill",
    "evaluate_infill_thresholds",
    "make_infill_examples",
    "plot_accuracy_vs_parallelism",
    "plot_infill",
    "score_infill",
]


@dataclass(frozen=True)
class InfillExample:
    """A function split around its hidden span: ``prefix + span + suffix`` are its tokens, in order."""

    name: str
    prefix: tuple[int, ...]
    span: tuple[int, ...]
    suffix: tuple[int, ...]


def make_infill_examples(
    functions: Sequence[FunctionSource],
    tokenizer: Any,
    span_length: int,
    *,
    seed: int = 0,
    limit: int | None = None,
    max_tokens: int = 256,
    spans_per_function: int = 1,
) -> list[InfillExample]:
    """Hide a span of ``span_length`` tokens in each function, at a position drawn with ``seed``.

    ``spans_per_function`` > 1 makes that many examples of each function, with distinct span positions (fewer when
    the body has fewer positions), for more measurements from the same held-out code.

    The span starts in the code of the body (after the signature and the docstring). Functions are skipped when their
    tokens do not decode back to their source exactly, when they are longer than ``max_tokens`` (the model's
    context must hold the whole function), or when their code body is shorter than the span. ``tokenizer`` must be a
    fast tokenizer (character offsets). The first ``limit`` examples are kept, functions in the given order.
    """
    if span_length < 1:
        raise ValueError(f"span_length must be >= 1, got {span_length}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if spans_per_function < 1:
        raise ValueError(f"spans_per_function must be >= 1, got {spans_per_function}")
    rng = random.Random(seed)
    examples = []
    for function in functions:
        body_char = _code_body_start(function.source)
        if body_char is None:
            continue
        encoded = tokenizer(function.source, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = list(encoded["input_ids"])
        if len(ids) > max_tokens or tokenizer.decode(ids) != function.source:
            continue
        body_start = next((i for i, (begin, _) in enumerate(encoded["offset_mapping"]) if begin >= body_char), len(ids))
        if len(ids) - body_start < span_length:
            continue
        positions = range(body_start, len(ids) - span_length + 1)
        for start in sorted(rng.sample(positions, min(spans_per_function, len(positions)))):
            examples.append(
                InfillExample(
                    name=f"{function.module}.{function.name}",
                    prefix=tuple(ids[:start]),
                    span=tuple(ids[start : start + span_length]),
                    suffix=tuple(ids[start + span_length :]),
                )
            )
        if limit is not None and len(examples) >= limit:
            return examples[:limit]
    if not examples:
        raise ValueError(f"no function can hold a span of {span_length} tokens within {max_tokens} tokens")
    return examples


def _code_body_start(source: str) -> int | None:
    """Character offset of the first body line after the signature and docstring; None for one-line functions."""
    node = ast.parse(source).body[0]
    body = node.body[1:] if len(node.body) > 1 and _is_docstring(node.body[0]) else node.body
    line = body[0].lineno
    if line <= node.lineno:
        return None
    return sum(len(text) for text in source.splitlines(keepends=True)[: line - 1])


def _is_docstring(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


def score_infill(examples: Sequence[InfillExample], predictions: Sequence[Sequence[int]], tokenizer: Any) -> dict:
    """Token accuracy, exact match and parse rate of predicted spans (each a list of ``len(span)`` token ids)."""
    if len(examples) != len(predictions) or not examples:
        raise ValueError(f"need one prediction per example, got {len(predictions)} for {len(examples)} examples")
    correct = total = exact = parsed = 0
    for example, predicted in zip(examples, predictions):
        if len(predicted) != len(example.span):
            raise ValueError(f"{example.name}: predicted {len(predicted)} tokens for a span of {len(example.span)}")
        hits = sum(int(p == s) for p, s in zip(predicted, example.span))
        correct += hits
        total += len(example.span)
        exact += int(hits == len(example.span))
        parsed += int(_parses(tokenizer.decode(list(example.prefix) + list(predicted) + list(example.suffix))))
    n = len(examples)
    return {"token_accuracy": correct / total, "exact_match": exact / n, "parse_rate": parsed / n, "num_examples": n}


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: null bytes in the source
        return False
    return True


def evaluate_infill(
    model: Any,
    tokenizer: Any,
    examples: Sequence[InfillExample],
    *,
    tokens_per_step: Sequence[int] = (1, 2, 4, 8),
    soft_masks: Mapping[str, Any] | None = None,
    batch_size: int = 16,
    progress: bool = True,
    **decode: Any,
) -> dict[str, dict[str, dict]]:
    """Decode every span at each tokens-per-step setting, once per decoding variant.

    soft_masks: variant name -> SoftMask (or None for binary masking); default ``{"binary": None}``.
    decode: further engine settings (alg, temperature, ...).
    returns: ``{variant: {str(tokens_per_step): metrics}}``
    """
    span_length = _span_length(examples)
    for tps in tokens_per_step:
        if tps < 1 or span_length % tps:
            raise ValueError(f"tokens_per_step {tps} must be >= 1 and divide the span length {span_length}")
    results: dict[str, dict[str, dict]] = {}
    runs = _decode_spans(
        model,
        tokenizer,
        examples,
        settings=tokens_per_step,
        setting_keywords=lambda tps: {"steps": span_length // tps},
        soft_masks=soft_masks,
        batch_size=batch_size,
        progress=progress,
        decode=decode,
    )
    for variant, tps, predictions, _ in runs:
        results.setdefault(variant, {})[str(tps)] = score_infill(examples, predictions, tokenizer)
    return results


def evaluate_infill_thresholds(
    model: Any,
    tokenizer: Any,
    examples: Sequence[InfillExample],
    *,
    thresholds: Sequence[float],
    soft_masks: Mapping[str, Any] | None = None,
    batch_size: int = 16,
    progress: bool = True,
    **decode: Any,
) -> dict[str, dict[str, dict]]:
    """Accuracy under parallelism: decode every span with confidence-threshold parallel decoding at each threshold.

    Besides :func:`score_infill`'s metrics, each setting reports ``tokens_per_step``: span tokens over the steps the
    spans took (each example counted until its own span is decoded), and its ``threshold``.
    returns: ``{variant: {str(threshold): metrics}}``
    """
    span_length = _span_length(examples)
    results: dict[str, dict[str, dict]] = {}
    runs = _decode_spans(
        model,
        tokenizer,
        examples,
        settings=thresholds,
        setting_keywords=lambda threshold: {"steps": span_length, "threshold": threshold, "return_steps": True},
        soft_masks=soft_masks,
        batch_size=batch_size,
        progress=progress,
        decode=decode,
    )
    for variant, threshold, predictions, steps_taken in runs:
        metrics = score_infill(examples, predictions, tokenizer)
        metrics.update(threshold=threshold, tokens_per_step=span_length * len(examples) / steps_taken)
        results.setdefault(variant, {})[str(threshold)] = metrics
    return results


def _span_length(examples: Sequence[InfillExample]) -> int:
    span_length = len(examples[0].span)
    if any(len(e.span) != span_length for e in examples):
        raise ValueError("all examples must hide spans of the same length")
    return span_length


def _decode_spans(
    model: Any,
    tokenizer: Any,
    examples: Sequence[InfillExample],
    *,
    settings: Sequence[Any],
    setting_keywords: Callable[[Any], dict[str, Any]],
    soft_masks: Mapping[str, Any] | None,
    batch_size: int,
    progress: bool,
    decode: Mapping[str, Any],
) -> Iterator[tuple[str, Any, list[list[int]], int]]:
    """For each variant (``soft_masks``, default binary) and setting: every example's decoded span and the steps all
    spans took (0 unless ``setting_keywords`` asks ``infill_tokens`` for ``return_steps``)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token, needed to fill the canvas after short suffixes")
    variants = dict(soft_masks) if soft_masks is not None else {"binary": None}
    span_length, pad_id = len(examples[0].span), pad_or_eos(tokenizer)
    # Batches of similar suffix length need little filling after the shorter suffixes.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].suffix))
    bar = tqdm(total=len(variants) * len(settings) * len(examples), desc="infill", disable=not progress)
    for variant, soft_mask in variants.items():
        for setting in settings:
            keywords = setting_keywords(setting)
            predictions: list[list[int]] = [[] for _ in examples]
            steps_taken = 0
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                out = infill_tokens(
                    model,
                    [examples[i].prefix for i in chunk],
                    [examples[i].suffix for i in chunk],
                    span_length=span_length,
                    pad_token_id=pad_id,
                    fill_token_id=tokenizer.eos_token_id,
                    soft_mask=soft_mask,
                    **keywords,
                    **decode,
                )
                spans, steps = out if keywords.get("return_steps") else (out, [])
                for i, span in zip(chunk, spans):
                    predictions[i] = span
                steps_taken += sum(steps)
                bar.update(len(chunk))
            yield variant, setting, predictions, steps_taken
    bar.close()


def plot_accuracy_vs_parallelism(
    results: Mapping[str, Mapping[str, Mapping[str, float]]], path: str, title: str = ""
) -> None:
    """Token accuracy and exact match against mean tokens per step (a threshold sweep), one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("token_accuracy", "exact_match")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), constrained_layout=True)
    for variant, by_threshold in results.items():
        points = sorted(by_threshold.values(), key=lambda m: m["tokens_per_step"])
        for ax, metric in zip(axes, metrics):
            ax.plot([m["tokens_per_step"] for m in points], [m[metric] for m in points], marker="o", label=variant)
    for ax, metric in zip(axes, metrics):
        ax.set_xlabel("mean tokens per step")
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_infill(results: Mapping[str, Mapping[str, Mapping[str, float]]], path: str, title: str = "") -> None:
    """Token accuracy, exact match and parse rate against tokens per step, one line per variant.

    results: ``{variant: {tokens_per_step: {metric: value}}}``; a metric value may be a ``(mean, std)`` pair, drawn
    with error bars (the reproduction's seeds).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("token_accuracy", "exact_match", "parse_rate")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), constrained_layout=True)
    for variant, by_tps in results.items():
        xs = sorted(by_tps, key=int)
        for ax, metric in zip(axes, metrics):
            values = [by_tps[x][metric] for x in xs]
            means = [v[0] if isinstance(v, (tuple, list)) else v for v in values]
            stds = [v[1] if isinstance(v, (tuple, list)) else 0.0 for v in values]
            ax.errorbar([int(x) for x in xs], means, yerr=stds, marker="o", capsize=3, label=variant)
    ticks = sorted({int(x) for by_tps in results.values() for x in by_tps})
    for ax, metric in zip(axes, metrics):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("tokens per step")
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
