"""The timing and results harness every benchmark uses: warm-up, repeated timing (wall time, or device time through
CUDA events, optionally of calls captured in a CUDA graph), medians with their spread, the environment a result was
measured in (:func:`softmask_ext.environment.environment`), and JSON/CSV/PNG output.

    from harness import device_time, wall_time, write_results

    timing = wall_time(step, warmup=1, repeats=10)         # Timing: median_ms, min_ms, max_ms, q1_ms, q3_ms, ...
    timing = device_time(op, repeats=20, graph_calls=20)   # CUDA: device time of one call, without host dispatch
    binary, sm = paired_wall_time([run_binary, run_sm], repeats=7)   # interleaved: sample i of each is one round
    write_results("results.json", {"rows": rows}, csv_rows=rows)   # + "environment": command, git commit, versions

A target is called met only from the spread of repeated runs (``Timing.min_ms``/``max_ms``), never from one run.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from softmask_ext.environment import cpu_model, environment

__all__ = [
    "Timing",
    "cpu_model",
    "device_time",
    "paired_wall_time",
    "environment",
    "plot",
    "synchronize",
    "time_fn",
    "timed",
    "wall_time",
    "write_csv",
    "write_results",
]
T = TypeVar("T")


@dataclass
class Timing:
    """Summary of repeated timings in milliseconds: median and spread (min, max, quartiles), and the samples."""

    median_ms: float
    min_ms: float
    max_ms: float
    q1_ms: float
    q3_ms: float
    samples_ms: list[float] = field(repr=False)

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    @property
    def spread(self) -> float:
        """(max - min) / median: the run-to-run variation, relative to the median."""
        return (self.max_ms - self.min_ms) / self.median_ms if self.median_ms else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "iqr_ms": self.iqr_ms, "spread": self.spread, "n": len(self.samples_ms)}

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Timing:
        if not samples_ms:
            raise ValueError("samples_ms must not be empty")
        ordered = sorted(float(s) for s in samples_ms)
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
        return cls(statistics.median(ordered), ordered[0], ordered[-1], q1, q3, [float(s) for s in samples_ms])


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device) if device is not None else None
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def _repeat(measure: Callable[[], float], repeats: int, min_seconds: float, max_repeats: int | None) -> list[float]:
    """At least ``repeats`` samples, and more while less than ``min_seconds`` has passed (up to ``max_repeats``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cap = max_repeats if max_repeats is not None else 10 * repeats
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - start < min_seconds and len(samples) < cap):
        samples.append(measure())
    return samples


def wall_time(
    fn: Callable[[], object],
    *,
    warmup: int = 1,
    repeats: int = 5,
    min_seconds: float = 0.0,
    max_repeats: int | None = None,
    device: torch.device | str | None = None,
) -> Timing:
    """Wall time of ``fn()`` (host dispatch included), the device synchronised before and after every call.

    ``warmup`` untimed calls come first (allocations, first-call dispatch, lazy initialisation, graph capture)."""
    for _ in range(warmup):
        fn()

    def measure() -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return (time.perf_counter() - start) * 1e3

    return Timing.of(_repeat(measure, repeats, min_seconds, max_repeats))


def paired_wall_time(
    fns: Sequence[Callable[[], object]],
    *,
    warmup: int = 1,
    repeats: int = 5,
    device: torch.device | str | None = None,
) -> list[Timing]:
    """Wall times of several calls to compare, interleaved: each round times every call once, starting from a
    different one each round (rotating), so a slow stretch of a shared machine falls on all of them rather than on
    whichever ran then. Sample ``i`` of every returned Timing comes from round ``i``, so ratios of paired samples
    cancel what the calls of a round share."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for round_index in range(repeats):
        for offset in range(len(fns)):
            i = (round_index + offset) % len(fns)
            synchronize(device)
            start = time.perf_counter()
            fns[i]()
            synchronize(device)
            samples[i].append((time.perf_counter() - start) * 1e3)
    return [Timing.of(s) for s in samples]


def device_time(
    fn: Callable[[], object],
    *,
    warmup: int = 1,
    repeats: int = 20,
    min_seconds: float = 0.0,
    max_repeats: int | None = None,
    graph_calls: int = 0,
) -> Timing:
    """Device time of one call of ``fn()`` on the current CUDA stream, measured with CUDA events.

    With ``graph_calls`` > 0, that many back-to-back calls are captured in one CUDA graph and each sample is one
    replay divided by ``graph_calls``: the host's dispatch is then not counted at all (for ops shorter than their
    launch overhead)."""
    if not torch.cuda.is_available():
        raise RuntimeError("device_time needs a CUDA GPU; use wall_time on the CPU")
    if graph_calls < 0:
        raise ValueError(f"graph_calls must be >= 0, got {graph_calls}")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside any capture (allocator, lazy initialisation)
        for _ in range(max(warmup, 1 if graph_calls else 0)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    run, per_sample = fn, 1
    if graph_calls:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(graph_calls):
                fn()
        graph.replay()
        run, per_sample = graph.replay, graph_calls

    def measure() -> float:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / per_sample

    return Timing.of(_repeat(measure, repeats, min_seconds, max_repeats))


def timed(fn: Callable[[], T], device: torch.device | str | None = None) -> tuple[float, T]:
    """(milliseconds, result) of one call of ``fn()``, the device synchronised before and after (for work that
    must be timed one call at a time, such as a training step whose state advances)."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3, out


def time_fn(fn: Callable[[], object], device: torch.device | str, **kw) -> Timing:
    """Device time (CUDA events) on a GPU, wall time on the CPU."""
    if torch.device(device).type == "cuda":
        return device_time(fn, **kw)
    kw.pop("graph_calls", None)
    return wall_time(fn, **kw)


def write_results(
    path: str | os.PathLike,
    report: dict,
    *,
    csv_rows: Sequence[dict] | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """Write ``report`` as JSON at ``path`` with an ``environment`` record first; with ``csv_rows``, the same rows as
    CSV beside it (same name, ``.csv``). Returns the report as written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {"environment": environment(device), **report}
    path.write_text(json.dumps(full, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    if csv_rows:
        write_csv(path.with_suffix(".csv"), csv_rows)
    return full


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Rows of flat dicts as CSV; the columns are the union of the rows' keys in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}", file=sys.stderr)


def plot(
    path: str | os.PathLike,
    rows: Sequence[dict],
    *,
    x: str,
    y: str,
    group: str | None = None,
    err: tuple[str, str] | None = None,
    title: str = "",
    logx: bool = False,
    logy: bool = False,
    xlabel: str | None = None,
    ylabel: str | None = None,
) -> None:
    """One line per value of ``group`` of ``y`` against ``x`` (rows sorted by ``x``); ``err`` names the (low, high)
    columns drawn as a band (e.g. the min and max of repeated runs). Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    groups: dict[object, list[dict]] = {}
    for row in rows:
        groups.setdefault(row.get(group) if group else y, []).append(row)
    for name, members in groups.items():
        members = sorted(members, key=lambda r: r[x])
        xs = [r[x] for r in members]
        line = ax.plot(xs, [r[y] for r in members], marker="o", label=str(name))[0]
        if err is not None:
            ax.fill_between(
                xs, [r[err[0]] for r in members], [r[err[1]] for r in members], alpha=0.2, color=line.get_color()
            )
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    for axis, log in ((ax.xaxis, logx), (ax.yaxis, logy)):
        if log:  # plain numbers at 1, 2 and 5 times the powers of ten
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
    if group:
        ax.legend(title=group)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)
