"""Training speed on a shared CPU: the default fine-tuning step alone and beside one busy process.

Each setting runs in a fresh interpreter (the OpenMP wait policy is fixed when torch loads) and times
``Trainer.train_step`` of the default run (the shipped tiny model, the ``tiny`` preset: full fine-tuning, batch 8 of
128 tokens, SM coin 0.5) after warm-up steps. Then the same again while one ``while True: pass`` process runs. The
slowdown is the ratio of the two median step times.

Settings:
  torch-default  torch imported before softmask_ext: the OpenMP runtime's default wait policy, one thread per CPU
  softmask       what the CLIs do (softmask_ext.cpu_threads): OMP_WAIT_POLICY=PASSIVE, one thread per usable CPU
  one-thread     OMP_NUM_THREADS=1

On a machine that other jobs already load, the absolute times move with them; compare the ratios, which are
measured back to back.

    python benchmarks/shared_cpu.py [--steps 8] [--out benchmarks/results/shared_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, tempfile, time
mode, steps, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode == "torch-default":
    import torch  # first: softmask_ext then leaves the OpenMP runtime's defaults alone
import softmask_ext
from softmask_ext.cpu_threads import configure_cpu_threads
import torch
if mode != "torch-default":
    configure_cpu_threads()
from softmask_ext.data import Example
from softmask_ext.conventions import SHIPPED_MODEL
from softmask_ext.training.presets import PRESETS
from softmask_ext.model import DreamModel
from softmask_ext.training import AdapterConfig, TrainConfig, Trainer

p = PRESETS["tiny"]
model = DreamModel.from_pretrained(SHIPPED_MODEL)
g = torch.Generator().manual_seed(0)
data = [Example(torch.randint(3, model.config.vocab_size, (p["max_length"],), generator=g),
                torch.zeros(p["max_length"], dtype=torch.bool)) for _ in range(64)]
with tempfile.TemporaryDirectory() as run_dir:
    config = TrainConfig(run_dir=run_dir, max_steps=1000, batch_size=p["batch_size"], lr=p["lr"], sm_lr=p["sm_lr"],
                         sm_prob=p["sm_prob"], clip=p["clip"], adapter=AdapterConfig(kind="full"))
    trainer = Trainer(model, data, config, device="cpu")
    for _ in range(warmup):
        trainer.train_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
print(json.dumps({"threads": torch.get_num_threads(), "step_s": times}))
"""

MODES = {
    "torch-default": {},
    "softmask": {},
    "one-thread": {"OMP_NUM_THREADS": "1"},
}


def run_worker(mode: str, steps: int, warmup: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_"))}
    env.update(MODES[mode])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", WORKER, mode, str(steps), str(warmup)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(mode: str, steps: int, warmup: int) -> dict:
    alone = run_worker(mode, steps, warmup)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # the neighbour is running before the worker starts
        shared = run_worker(mode, steps, warmup)
    finally:
        busy.kill()
        busy.wait()
    a, s = statistics.median(alone["step_s"]), statistics.median(shared["step_s"])
    return {
        "threads": alone["threads"],
        "alone_step_s": a,
        "shared_step_s": s,
        "slowdown": s / a,
        "alone_all_s": alone["step_s"],
        "shared_all_s": shared["step_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shared_cpu.json")
    args = p.parse_args()
    load_before = os.getloadavg()
    results = {}
    for mode in args.modes:
        results[mode] = measure(mode, args.steps, args.warmup)
        r = results[mode]
        print(
            f"{mode:14s} threads {r['threads']}: alone {r['alone_step_s'] * 1e3:7.1f} ms/step, beside a busy "
            f"process {r['shared_step_s'] * 1e3:7.1f} ms/step, slowdown {r['slowdown']:.2f}x",
            flush=True,
        )
    report = {
        "benchmark": "shared_cpu",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "steps": args.steps,
        "warmup": args.warmup,
        "results": results,
    }
    harness.write_results(args.out, report, device="cpu")


if __name__ == "__main__":
    main()
