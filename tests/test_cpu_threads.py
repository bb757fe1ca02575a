"""Threads on shared CPUs: the passive OpenMP wait policy and the thread count the CLIs choose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from softmask_ext.cpu_threads import usable_cpus

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, os, sys
if sys.argv[1] == "torch-first":
    import torch
import softmask_ext
from softmask_ext.cpu_threads import configure_cpu_threads
print(json.dumps({"policy": os.environ.get("OMP_WAIT_POLICY"), "threads": configure_cpu_threads()}))
"""


def _probe(order: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, order],
        check=True,
        capture_output=True,
        text=True,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_passive_wait_policy_and_one_thread_per_usable_cpu():
    assert _probe("package-first") == {"policy": "PASSIVE", "threads": usable_cpus()}


def test_the_users_settings_win():
    assert _probe("package-first", OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1") == {"policy": "ACTIVE", "threads": 1}
    # torch loaded first: its OpenMP runtime has read the policy already, so the package leaves it alone.
    assert _probe("torch-first")["policy"] is None


def test_usable_cpus_is_within_the_affinity_mask():
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.slow
def test_a_busy_neighbour_slows_the_default_run_at_most_3x(tmp_path):
    """benchmarks/shared_cpu.py: the default fine-tuning step alone and beside one busy process (minutes)."""
    out = tmp_path / "shared_cpu.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "shared_cpu.py"),
            "--modes",
            "softmask",
            "--steps",
            "4",
            "--out",
            str(out),
        ],
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert json.loads(out.read_text())["results"]["softmask"]["slowdown"] <= 3.0
