"""Kernel benchmark: the soft-mask feedback (top-k/entropy + lam + blend) of ours against the PyTorch reference and
the authors' dense path, plus each of our two ops alone.

Providers, for R logits rows of a V-token vocabulary and a [V, D] table:
  ours       softmask_ext.ops.topk_entropy -> SoftMask.lam -> softmask_ext.ops.blend_embeddings
  reference  the same three steps with softmask_ext.reference (topk + softmax + log_softmax entropy + gather)
  dense      the authors' path: entropy of the full softmax, then a dense [R, V] mixture times the table
Times are medians over many runs (CUDA events on a GPU). On a GPU the ops alone are timed on the device (20 calls
captured in a CUDA graph and replayed, so the host's dispatch is not counted) and report achieved GB/s (one read of
the logits; the gathered table rows and the output for the blend) and the share of the card's copy bandwidth,
measured in the same run.

--variants compares the variants of the CUDA top-k/entropy kernel (SOFTMASK_TOPK_VARIANT) side by side: bf16,
V = 152,064, rows 1024 and 4096, k = 1, 3, 5; 7 rounds, each timing every variant in turn (device time as above)
so that clock and thermal drift hit every variant alike; median and range over the rounds, the share of the copy
bandwidth, and whether the variant's ids equal the default's.

  python benchmarks/kernel_bench.py [--device cpu|cuda] [--quick] [--threads 2] [--out results.json]
  python benchmarks/kernel_bench.py --variants [--out variants.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from softmask_ext import SoftMask, ops, reference
from softmask_ext.conventions import default_device

import harness

MASK_TOKEN_ID = 151666 % 32768  # any valid row; Dream's mask id when V = 152064
DIM = 3584
TARGET = dict(rows=64, vocab=152064, k=3, dtype="float32")  # the CPU target configuration (docs/results.md)


@dataclass
class Config:
    rows: int
    vocab: int
    k: int
    dtype: str


@dataclass
class Result:
    device: str
    rows: int
    vocab: int
    k: int
    dim: int
    dtype: str
    provider: str
    op: str
    median_ms: float
    gb_per_s: float | None = None
    pct_of_copy_bandwidth: float | None = None


def sweep(device: str, quick: bool) -> list[Config]:
    if quick:
        return [Config(**TARGET), Config(64, 152064, 3, "bfloat16")]
    rows = [16, 64, 256, 1024, 4096] if device == "cuda" else [16, 64, 256]
    return [
        Config(r, v, k, dtype)
        for dtype in ("float32", "bfloat16")
        for v in (32768, 152064)
        for r in rows
        for k in (1, 3, 5)
    ]


class Timer:
    """Median time of fn in milliseconds (harness.time_fn: CUDA events on a GPU, wall time on the CPU)."""

    def __init__(self, device: str, repeats: int, min_seconds: float):
        self.device, self.repeats, self.min_seconds = device, repeats, min_seconds

    def __call__(self, fn: Callable[[], object], repeats: int | None = None) -> float:
        repeats = repeats or self.repeats
        return harness.time_fn(fn, self.device, repeats=repeats, min_seconds=self.min_seconds).median_ms


def device_ms(fn: Callable[[], object], calls: int = 20, replays: int = 10) -> float:
    """Device time of one call of fn in milliseconds, without the host's dispatch: `calls` back-to-back calls are
    captured in one CUDA graph, and the median replay time is divided by `calls`."""
    return harness.device_time(fn, repeats=replays, graph_calls=calls).median_ms


def copy_bandwidth_gb_per_s(timer: Timer) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB buffer."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), repeats=20)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def feedback_providers(logits: torch.Tensor, weight: torch.Tensor, k: int, soft_mask: SoftMask):
    """The three ways to build soft embeddings for every row of logits (all rows masked)."""
    mask_ids = torch.full((logits.shape[0], 1), MASK_TOKEN_ID % weight.shape[0], device=logits.device)

    def blend_inputs(ids, probs, negh):
        lam = soft_mask.lam(negh)
        return torch.cat([mask_ids, ids], dim=1), torch.cat([(1 - lam)[:, None], lam[:, None] * probs], dim=1)

    def ours():
        ids, coeffs = blend_inputs(*ops.topk_entropy(logits, k))
        return ops.blend_embeddings(weight, ids, coeffs)

    def ref():
        ids, coeffs = blend_inputs(*reference.topk_entropy(logits, k))
        return reference.blend_embeddings(weight, ids, coeffs)

    def dense():
        lam = soft_mask.lam(reference.neg_entropy(logits))
        return reference.dense_soft_embeddings(logits, weight, int(mask_ids[0, 0]), lam, k)

    return {"ours": ours, "reference": ref, "dense": dense}


def run(device: str, quick: bool, threads: int, out: Path | None) -> dict:
    if device == "cpu":
        torch.set_num_threads(threads)
    timer = Timer(device, repeats=5 if device == "cpu" else 20, min_seconds=0.5 if device == "cpu" else 0.1)
    peak = copy_bandwidth_gb_per_s(timer) if device == "cuda" else None
    soft_mask = SoftMask(k=3, scale=0.5).to(device)
    results: list[Result] = []
    tables: dict[tuple[int, str], torch.Tensor] = {}
    configs = sweep(device, quick)
    with torch.no_grad():
        for cfg in tqdm(configs, desc=f"kernel bench ({device})"):
            dtype = getattr(torch, cfg.dtype)
            key = (cfg.vocab, cfg.dtype)
            if key not in tables:
                tables.clear()
                tables[key] = torch.randn(cfg.vocab, DIM, device=device).to(dtype)
            weight = tables[key]
            logits = (torch.randn(cfg.rows, cfg.vocab, device=device) * 4).to(dtype)
            item = logits.element_size()
            base = dict(device=device, rows=cfg.rows, vocab=cfg.vocab, k=cfg.k, dim=DIM, dtype=cfg.dtype)

            for provider, fn in feedback_providers(logits, weight, cfg.k, soft_mask).items():
                # The dense path does not depend on k; on 2 CPU cores it takes seconds per call beyond 64 rows, and
                # in bf16 torch's CPU GEMM falls back to a scalar loop without AVX-512 BF16 (a minute per call).
                cpu_slow = device == "cpu" and (cfg.rows > 64 or cfg.dtype != "float32")
                if provider == "dense" and (cfg.k != 3 or cpu_slow):
                    continue
                results.append(Result(**base, provider=provider, op="feedback", median_ms=timer(fn)))

            # Each op alone: device time (CUDA-graph replay) on a GPU, where one call is shorter than its dispatch.
            op_timer = device_ms if device == "cuda" else timer
            ids, probs, negh = ops.topk_entropy(logits, cfg.k)
            ms = op_timer(partial(ops.topk_entropy, logits, cfg.k))
            read = logits.numel() * item + ids.numel() * 8 + probs.numel() * 4 + negh.numel() * 4
            results.append(
                _with_bandwidth(Result(**base, provider="ours", op="topk_entropy", median_ms=ms), read, peak)
            )
            blend_ids = torch.cat([ids, ids[:, :1]], dim=1)
            coeffs = torch.cat([probs, probs[:, :1]], dim=1)
            ms = op_timer(partial(ops.blend_embeddings, weight, blend_ids, coeffs))
            moved = blend_ids.numel() * (DIM * item + 12) + cfg.rows * DIM * item
            results.append(_with_bandwidth(Result(**base, provider="ours", op="blend", median_ms=ms), moved, peak))
            del logits

    summary = _summarise(results)
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else harness.cpu_model(),
        "cpu_isa": ops.cpu_isa(),
        "threads": threads if device == "cpu" else None,
        "torch": torch.__version__,
        "copy_bandwidth_gb_per_s": peak,
        "quick": quick,
        "summary": summary,
        "results": [asdict(r) for r in results],
    }
    _print_table(results, report)
    if out is not None:
        harness.write_results(out, report, device=device)
        lines = [dict(s, setting=f"{s['dtype']} V={s['vocab']} k={s['k']}") for s in summary]
        harness.plot(
            out.with_suffix(".png"),
            lines,
            x="rows",
            y="speedup_vs_reference",
            group="setting",
            logx=True,
            logy=True,
            title=f"SM feedback, ours vs the PyTorch reference ({report['device']})",
            ylabel="speed-up (x)",
        )
    return report


VARIANT_SWEEP = [Config(rows, 152064, k, "bfloat16") for rows in (1024, 4096) for k in (1, 3, 5)]
TARGET_PCT_OF_COPY_BANDWIDTH = 75.0


def compare_variants(out: Path | None, rounds: int = 7) -> dict:
    """topk_entropy under every kernel variant, side by side (see the module docstring)."""
    variants = ops.TOPK_VARIANTS
    if not ops.CUDA_KERNELS or not variants:
        raise SystemExit("--variants needs the CUDA kernels of the extension")
    previous = os.environ.get("SOFTMASK_TOPK_VARIANT")
    peak = copy_bandwidth_gb_per_s(Timer("cuda", repeats=20, min_seconds=0.1))
    rows = []
    try:
        for cfg in tqdm(VARIANT_SWEEP, desc="topk_entropy variants"):
            logits = (torch.randn(cfg.rows, cfg.vocab, device="cuda") * 4).to(getattr(torch, cfg.dtype))
            nbytes = logits.numel() * logits.element_size() + cfg.rows * (cfg.k * 12 + 4)
            times, ids = {v: [] for v in variants}, {}
            for _ in range(rounds):
                for variant in variants:  # the extension reads the variable at every call (so at capture)
                    os.environ["SOFTMASK_TOPK_VARIANT"] = variant
                    ids[variant] = ops.topk_entropy(logits, cfg.k)[0]
                    times[variant].append(device_ms(partial(ops.topk_entropy, logits, cfg.k), replays=5))
            for variant in variants:
                ms = times[variant]
                pct = [100 * nbytes / (t * 1e-3) / 1e9 / peak for t in (statistics.median(ms), max(ms), min(ms))]
                rows.append(
                    dict(
                        rows=cfg.rows,
                        vocab=cfg.vocab,
                        k=cfg.k,
                        dtype=cfg.dtype,
                        variant=variant,
                        median_ms=statistics.median(ms),
                        min_ms=min(ms),
                        max_ms=max(ms),
                        rounds=rounds,
                        gb_per_s=nbytes / (statistics.median(ms) * 1e-3) / 1e9,
                        pct_of_copy_bandwidth=pct[0],
                        pct_of_copy_bandwidth_range=pct[1:],
                        same_ids_as_default=bool(torch.equal(ids[variant], ids[ops.DEFAULT_TOPK_VARIANT])),
                    )
                )
            del logits
    finally:
        if previous is None:
            os.environ.pop("SOFTMASK_TOPK_VARIANT", None)
        else:
            os.environ["SOFTMASK_TOPK_VARIANT"] = previous
    env = harness.environment("cuda")
    report = dict(
        copy_bandwidth_gb_per_s=peak,
        target_pct=TARGET_PCT_OF_COPY_BANDWIDTH,
        default_variant=ops.DEFAULT_TOPK_VARIANT,
        results=rows,
    )
    print(f"\n{env['gpu']} | torch {env['torch']} | CUDA {env['cuda']} | copy bandwidth {peak:.0f} GB/s")
    print(
        f"{'rows':>5} {'k':>2} | "
        + " | ".join(f"{v:>20}" for v in variants)
        + "   (% of copy bandwidth, median [range])"
    )
    for cfg in VARIANT_SWEEP:
        cells = []
        for variant in variants:
            r = next(r for r in rows if (r["rows"], r["k"], r["variant"]) == (cfg.rows, cfg.k, variant))
            lo, hi = r["pct_of_copy_bandwidth_range"]
            flag = "" if r["same_ids_as_default"] else " IDS!"
            cells.append(f"{r['pct_of_copy_bandwidth']:5.1f} [{lo:4.0f}-{hi:4.0f}]{flag}".rjust(20))
        print(f"{cfg.rows:>5} {cfg.k:>2} | " + " | ".join(cells))
    if out is not None:
        report = harness.write_results(out, report, device="cuda")
    return report


def _with_bandwidth(result: Result, nbytes: int, peak: float | None) -> Result:
    if peak is not None:
        result.gb_per_s = nbytes / (result.median_ms * 1e-3) / 1e9
        result.pct_of_copy_bandwidth = 100 * result.gb_per_s / peak
    return result


def _summarise(results: list[Result]) -> list[dict]:
    """Speed-ups of ours over the reference and dense paths for every configuration with feedback timings."""
    by_config: dict[tuple, dict[str, float]] = {}
    for r in results:
        if r.op == "feedback":
            by_config.setdefault((r.rows, r.vocab, r.k, r.dtype), {})[r.provider] = r.median_ms
    rows = []
    for (rows_, vocab, k, dtype), t in by_config.items():
        entry = dict(rows=rows_, vocab=vocab, k=k, dtype=dtype, **{f"{p}_ms": v for p, v in t.items()})
        entry["speedup_vs_reference"] = t["reference"] / t["ours"]
        if "dense" in t:
            entry["speedup_vs_dense"] = t["dense"] / t["ours"]
        entry["target"] = dict(rows=rows_, vocab=vocab, k=k, dtype=dtype) == TARGET
        rows.append(entry)
    return rows


def _print_table(results: list[Result], report: dict) -> None:
    print(
        f"\ndevice: {report['device']} | torch {report['torch']} | CPU ISA {report['cpu_isa']}"
        + (
            f" | copy bandwidth {report['copy_bandwidth_gb_per_s']:.0f} GB/s"
            if report["copy_bandwidth_gb_per_s"]
            else ""
        )
        + (f" | {report['threads']} threads" if report["threads"] else "")
    )
    header = (
        f"{'rows':>5} {'V':>7} {'k':>2} {'dtype':>9} | {'ours ms':>9} {'ref ms':>9} {'dense ms':>9} "
        f"| {'x ref':>6} {'x dense':>7}"
    )
    print(header)
    print("-" * len(header))
    for s in report["summary"]:
        dense = f"{s['dense_ms']:9.3f}" if "dense_ms" in s else f"{'-':>9}"
        xdense = f"{s['speedup_vs_dense']:7.1f}" if "speedup_vs_dense" in s else f"{'-':>7}"
        mark = "  <- target" if s["target"] else ""
        print(
            f"{s['rows']:>5} {s['vocab']:>7} {s['k']:>2} {s['dtype']:>9} | {s['ours_ms']:9.3f} "
            f"{s['reference_ms']:9.3f} {dense} | {s['speedup_vs_reference']:6.1f} {xdense}{mark}"
        )
    ops_rows = [r for r in results if r.op != "feedback" and r.gb_per_s is not None]
    if ops_rows:
        print(f"\n{'op':>13} {'rows':>5} {'V':>7} {'k':>2} {'dtype':>9} | {'ms':>8} {'GB/s':>7} {'% copy bw':>9}")
        for r in ops_rows:
            print(
                f"{r.op:>13} {r.rows:>5} {r.vocab:>7} {r.k:>2} {r.dtype:>9} | {r.median_ms:8.3f} {r.gb_per_s:7.0f} "
                f"{r.pct_of_copy_bandwidth:9.1f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device().type)
    parser.add_argument("--quick", action="store_true", help="only the target configuration (fp32 and bf16)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU mode)")
    parser.add_argument("--variants", action="store_true", help="compare the CUDA top-k/entropy kernel variants")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if (args.device == "cuda" or args.variants) and not torch.cuda.is_available():
        parser.error("--device cuda and --variants need a CUDA GPU")
    if args.variants:
        compare_variants(args.out)
    else:
        run(args.device, args.quick, args.threads, args.out)


if __name__ == "__main__":
    main()
