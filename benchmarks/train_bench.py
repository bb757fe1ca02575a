"""Training step time and peak memory: binary masking vs soft-masking (SM).

Modes, each timed as the trainer runs it (``Trainer.train_step``: noise, forward(s), loss, backward, clip, AdamW):
  binary  sm_prob = 0   one plain pass per step
  sm      sm_prob = 1   the two-pass SM step (pass 1 without gradient + pass 2 with gradient)
  mixed   sm_prob = 0.5 what SM fine-tuning costs on average; reported as 0.5 * (binary + sm) (its expectation),
          next to the measured mean of steps whose coin landed either way.

CPU (default without a GPU): the shipped tiny model (or a random one of its shape), full fine-tuning.
GPU: a randomly initialised Dream-7B-shaped model built directly in bf16 on the GPU, DoRA r=16 on q/k/v/o,
sequence 2048, batch 1, gradient checkpointing, bf16 autocast (the paper's recipe). Targets there: peak memory
<= 40 GB, mixed / binary <= 1.25 (the floor is about 1.13: pass 1 is one forward against about four forwards'
worth of work for a checkpointed forward + backward).

    python benchmarks/train_bench.py [--device cuda|cpu] [--quick] [--budget-s 120] --out results.json
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

from softmask_ext.data import Example
from softmask_ext.model import DreamConfig, DreamModel, load_model
from softmask_ext.training import AdapterConfig, TrainConfig, Trainer

SHIPPED = Path(__file__).resolve().parents[1] / "softmask_ext" / "assets" / "tiny-coder"


def build_model(device: torch.device, quick: bool) -> tuple[DreamModel, dict]:
    if device.type == "cuda":
        config = DreamConfig()  # Dream-v0-7B
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                model = DreamModel(config)
        finally:
            torch.set_default_dtype(torch.float32)
        return model, dict(seq=2048, batch=1, adapter=AdapterConfig(kind="dora", rank=16, alpha=16.0),
                           bf16=True, checkpointing=True)
    if (SHIPPED / "model.safetensors").exists():
        model = load_model(SHIPPED)
    else:
        model = DreamModel(DreamConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, mask_token_id=1,
                                       pad_token_id=0, eos_token_id=0, bos_token_id=0, max_position_embeddings=2048))
    return model, dict(seq=128 if quick else 256, batch=4 if quick else 8, adapter=AdapterConfig(kind="full"),
                       bf16=False, checkpointing=False)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, whole process high-water mark


MODES = {"binary": 0.0, "sm": 1.0, "mixed": 0.5}


def timed_step(trainer: Trainer, device: torch.device) -> tuple[float, bool, float]:
    """(seconds, whether the step used SM, peak memory of the step in GiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    record = trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, record["sm_batches"] > 0, peak_memory_gb(device)


def time_modes(trainer: Trainer, device: torch.device, rounds: int, deadline: float) -> dict:
    """Steps of the three modes interleaved round by round (one warm-up round first), so that drift in the
    machine's speed and the random noise levels hit every mode alike."""
    results = {mode: {"step_s": [], "soft": [], "peak_memory_gb": 0.0} for mode in MODES}
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
            r["peak_memory_gb"] = max(r["peak_memory_gb"], peak)
    for r in results.values():
        r["step_s_median"] = statistics.median(r["step_s"])
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny budgets (dry run)")
    p.add_argument("--budget-s", type=float, default=120.0, help="time budget of the timed steps, all modes")
    p.add_argument("--steps", type=int, default=10,
                   help="timed rounds of the three modes (fewer when the budget runs out)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, shape = build_model(device, args.quick)
    vocab = model.config.vocab_size
    data = [Example(torch.randint(5, vocab, (shape["seq"],)), torch.zeros(shape["seq"], dtype=torch.bool))
            for _ in range(shape["batch"] * 64)]
    steps = 2 if args.quick else args.steps
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "threads": torch.get_num_threads(), "seq": shape["seq"],
                     "batch": shape["batch"], "adapter": shape["adapter"].kind,
                     "gradient_checkpointing": shape["checkpointing"], "bf16": shape["bf16"],
                     "parameters": sum(p.numel() for p in model.parameters()), "modes": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(run_dir=tmp, max_steps=10**6, batch_size=shape["batch"], lr=1e-5,
                             adapter=shape["adapter"], gradient_checkpointing=shape["checkpointing"],
                             bf16=shape["bf16"], sm_prob=0.5)
        trainer = Trainer(model, data, config, device=device)
        results["modes"] = time_modes(trainer, device, steps, start + args.budget_s)
    for mode, r in results["modes"].items():
        print(mode, {k: v for k, v in r.items() if k not in ("step_s", "soft")}, flush=True)
    binary = results["modes"]["binary"]["step_s_median"]
    sm = results["modes"]["sm"]["step_s_median"]
    results["sm_step_over_binary"] = sm / binary
    results["mixed_expected_over_binary"] = 0.5 * (binary + sm) / binary
    results["mixed_measured_over_binary"] = statistics.mean(results["modes"]["mixed"]["step_s"]) / binary
    results["mixed_sm_share"] = statistics.mean(results["modes"]["mixed"]["soft"])  # SM steps among the measured
    results["peak_memory_gb"] = max(m["peak_memory_gb"] for m in results["modes"].values())
    if device.type == "cuda":
        results["targets"] = {"peak_memory_le_40gb": results["peak_memory_gb"] <= 40.0,
                              "mixed_le_1.25x_binary": results["mixed_expected_over_binary"] <= 1.25}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "modes"}, indent=2))


if __name__ == "__main__":
    main()
