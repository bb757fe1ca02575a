"""Training step time and peak memory: binary masking vs soft-masking (SM).

Modes, each timed as the trainer runs it (``Trainer.train_step``: noise, forward(s), loss, backward, clip, AdamW):
  binary  sm_prob = 0   one plain pass per step
  sm      sm_prob = 1   the two-pass SM step (pass 1 without gradient + pass 2 with gradient)
  mixed   sm_prob = 0.5 what SM fine-tuning costs on average; reported as 0.5 * (binary + sm) (its expectation),
          next to the measured mean of steps whose coin landed either way.

CPU (default without a GPU): the shipped tiny model (or a random one of its shape), full fine-tuning.
GPU: a randomly initialised Dream-7B-shaped model built directly in bf16 on the GPU, DoRA r=16 on q/k/v/o,
sequence 2048, batch 1, gradient checkpointing, bf16 autocast (the paper's recipe). Targets there: peak memory
<= 40 GiB, mixed / binary <= 1.25 (the floor is about 1.13: pass 1 is one forward against about four forwards'
worth of work for a checkpointed forward + backward); each is called met from the medians and the spread of the
repeated steps of one run (the ratio of the slowest SM step to the fastest binary step is recorded beside it).

    python benchmarks/train_bench.py [--device cuda|cpu] [--quick] [--budget-s 120] [--out results.json]

Timing and the result file (with its environment record, a CSV of the steps and a plot) go through harness.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from softmask_ext.conventions import MODEL_WEIGHTS, SHIPPED_MODEL, default_device
from softmask_ext.data import Example
from softmask_ext.model import DreamConfig, DreamModel, load_model
from softmask_ext.training import AdapterConfig, TrainConfig, Trainer

from harness import Timing, plot, timed, write_results


def build_model(device: torch.device, quick: bool) -> tuple[DreamModel, dict]:
    if device.type == "cuda":
        config = DreamConfig()  # Dream-v0-7B
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                model = DreamModel(config)
        finally:
            torch.set_default_dtype(torch.float32)
        return model, dict(
            seq=2048, batch=1, adapter=AdapterConfig(kind="dora", rank=16, alpha=16.0), bf16=True, checkpointing=True
        )
    if (SHIPPED_MODEL / MODEL_WEIGHTS).exists():
        model = load_model(SHIPPED_MODEL)
    else:
        model = DreamModel(
            DreamConfig(
                vocab_size=4096,
                hidden_size=256,
                intermediate_size=704,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                mask_token_id=1,
                pad_token_id=0,
                eos_token_id=0,
                bos_token_id=0,
                max_position_embeddings=2048,
            )
        )
    return model, dict(
        seq=128 if quick else 256,
        batch=4 if quick else 8,
        adapter=AdapterConfig(kind="full"),
        bf16=False,
        checkpointing=False,
    )


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, whole process high-water mark


MODES = {"binary": 0.0, "sm": 1.0, "mixed": 0.5}


def timed_step(trainer: Trainer, device: torch.device) -> tuple[float, bool, float]:
    """(seconds, whether the step used SM, peak memory of the step in GiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms, record = timed(trainer.train_step, device)
    return ms / 1e3, record["sm_batches"] > 0, peak_memory_gib(device)


def time_modes(trainer: Trainer, device: torch.device, rounds: int, deadline: float) -> dict:
    """Steps of the three modes interleaved round by round (one warm-up round first), so that drift in the
    machine's speed and the random noise levels hit every mode alike."""
    results = {mode: {"step_s": [], "soft": [], "peak_memory_gib": 0.0} for mode in MODES}
    for round_ in range(rounds + 1):
        if round_ > 2 and time.perf_counter() > deadline:
            break
        for mode, prob in MODES.items():
            trainer.config.sm_prob = prob
            seconds, soft, peak = timed_step(trainer, device)
            if round_ == 0:
                continue
            r = results[mode]
            r["step_s"].append(seconds)
            r["soft"].append(soft)
            r["peak_memory_gib"] = max(r["peak_memory_gib"], peak)
    for r in results.values():
        r["timing"] = Timing.of([1e3 * s for s in r["step_s"]]).to_dict()
        r["step_s_median"] = r["timing"]["median_ms"] / 1e3
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=str(default_device()))
    p.add_argument("--quick", action="store_true", help="tiny budgets (dry run)")
    p.add_argument("--budget-s", type=float, default=120.0, help="time budget of the timed steps, all modes")
    p.add_argument(
        "--steps", type=int, default=10, help="timed rounds of the three modes (fewer when the budget runs out)"
    )
    p.add_argument("--out", type=Path, help="write the results as JSON here (and the steps as CSV and PNG beside it)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, shape = build_model(device, args.quick)
    vocab = model.config.vocab_size
    data = [
        Example(torch.randint(5, vocab, (shape["seq"],)), torch.zeros(shape["seq"], dtype=torch.bool))
        for _ in range(shape["batch"] * 64)
    ]
    steps = 2 if args.quick else args.steps
    results: dict = {
        "seq": shape["seq"],
        "batch": shape["batch"],
        "adapter": shape["adapter"].kind,
        "gradient_checkpointing": shape["checkpointing"],
        "bf16": shape["bf16"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "modes": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            run_dir=tmp,
            max_steps=10**6,
            batch_size=shape["batch"],
            lr=1e-5,
            adapter=shape["adapter"],
            gradient_checkpointing=shape["checkpointing"],
            bf16=shape["bf16"],
            sm_prob=0.5,
        )
        trainer = Trainer(model, data, config, device=device)
        results["modes"] = modes = time_modes(trainer, device, steps, start + args.budget_s)
    for mode, r in modes.items():
        t = r["timing"]
        print(
            f"{mode:>7}: {t['median_ms'] / 1e3:.3f} s/step (median of {t['n']}, min {t['min_ms'] / 1e3:.3f}, "
            f"max {t['max_ms'] / 1e3:.3f}), peak {r['peak_memory_gib']:.2f} GiB",
            flush=True,
        )
    binary, sm = modes["binary"]["timing"], modes["sm"]["timing"]
    results["sm_step_over_binary"] = sm["median_ms"] / binary["median_ms"]
    results["sm_step_over_binary_range"] = [sm["min_ms"] / binary["max_ms"], sm["max_ms"] / binary["min_ms"]]
    results["mixed_expected_over_binary"] = 0.5 * (binary["median_ms"] + sm["median_ms"]) / binary["median_ms"]
    results["mixed_expected_over_binary_worst"] = 0.5 * (binary["min_ms"] + sm["max_ms"]) / binary["min_ms"]
    results["mixed_measured_over_binary"] = statistics.mean(modes["mixed"]["step_s"]) / (binary["median_ms"] / 1e3)
    results["mixed_sm_share"] = statistics.mean(modes["mixed"]["soft"])  # SM steps among the measured
    results["peak_memory_gib"] = max(m["peak_memory_gib"] for m in modes.values())
    if device.type == "cuda":
        results["targets"] = {
            "peak_memory_le_40gib": results["peak_memory_gib"] <= 40.0,
            "mixed_le_1.25x_binary": results["mixed_expected_over_binary"] <= 1.25,
            "mixed_le_1.25x_binary_worst_case": results["mixed_expected_over_binary_worst"] <= 1.25,
        }
    if args.out is not None:
        steps_rows = [
            dict(mode=mode, round=i + 1, step_s=s, sm=soft)
            for mode, r in modes.items()
            for i, (s, soft) in enumerate(zip(r["step_s"], r["soft"]))
        ]
        results = write_results(args.out, results, csv_rows=steps_rows, device=device)
        plot(
            args.out.with_suffix(".png"),
            steps_rows,
            x="round",
            y="step_s",
            group="mode",
            title=f"training step time ({results['environment']['gpu'] or 'CPU'})",
            ylabel="s / step",
        )
    print(json.dumps({k: v for k, v in results.items() if k not in ("modes", "environment")}, indent=2))
    return results


if __name__ == "__main__":
    main()
