"""benchmarks/harness.py: timing statistics, warm-up, the environment record and the JSON/CSV/PNG output."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import harness  # benchmarks/harness.py (pyproject's pytest pythonpath)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_timing_statistics():
    t = harness.Timing.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_ms, t.min_ms, t.max_ms, t.q1_ms, t.q3_ms) == (3.0, 1.0, 5.0, 2.0, 4.0)
    assert t.iqr_ms == 2.0 and t.spread == pytest.approx(4.0 / 3.0)
    assert t.samples_ms == [5.0, 1.0, 3.0, 2.0, 4.0]  # in the order measured
    d = t.to_dict()
    assert d["n"] == 5 and d["iqr_ms"] == 2.0
    one = harness.Timing.of([7.0])
    assert (one.median_ms, one.q1_ms, one.q3_ms, one.spread) == (7.0, 7.0, 7.0, 0.0)
    with pytest.raises(ValueError, match="samples_ms"):
        harness.Timing.of([])


def test_wall_time_warms_up_then_repeats():
    calls = []
    t = harness.wall_time(lambda: calls.append(1), warmup=2, repeats=4)
    assert len(calls) == 6 and len(t.samples_ms) == 4 and t.min_ms >= 0
    with pytest.raises(ValueError, match="repeats"):
        harness.wall_time(lambda: None, repeats=0)


def test_paired_wall_time_rotates_the_order_of_each_round():
    order = []
    a, b, c = (lambda name=name: order.append(name) for name in "abc")
    timings = harness.paired_wall_time([a, b, c], warmup=1, repeats=4)
    assert order[:3] == list("abc")  # the warm-up calls
    assert order[3:] == list("abcbcacababc")
    assert [len(t.samples_ms) for t in timings] == [4, 4, 4]
    with pytest.raises(ValueError, match="repeats"):
        harness.paired_wall_time([a], repeats=0)


def test_wall_time_runs_until_min_seconds_up_to_the_cap():
    t = harness.wall_time(lambda: None, warmup=0, repeats=2, min_seconds=60.0, max_repeats=7)
    assert len(t.samples_ms) == 7


def test_timed_returns_the_result():
    ms, out = harness.timed(lambda: 41 + 1, "cpu")
    assert out == 42 and ms >= 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_device_time_needs_a_gpu():
    with pytest.raises(RuntimeError, match="CUDA"):
        harness.device_time(lambda: None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("graph_calls", [0, 5])
def test_device_time_on_a_gpu(graph_calls):
    x = torch.randn(1 << 20, device="cuda")
    t = harness.device_time(lambda: x.mul_(1.0), repeats=5, graph_calls=graph_calls)
    assert len(t.samples_ms) == 5 and t.median_ms > 0


def test_environment_record():
    env = harness.environment("cpu")
    for key in (
        "command",
        "git_commit",
        "date_utc",
        "machine",
        "cpu",
        "cpu_count",
        "gpu",
        "python",
        "torch",
        "cuda",
        "torch_threads",
        "extension_loaded",
        "cpu_isa",
    ):
        assert key in env
    assert env["torch"] == torch.__version__ and env["gpu"] is None and env["cpu"]


def test_write_results_json_and_csv(tmp_path):
    rows = [{"a": 1, "b": 2.5}, {"a": 2, "c": "x"}]
    written = harness.write_results(tmp_path / "sub" / "r.json", {"rows": rows}, csv_rows=rows)
    on_disk = json.loads((tmp_path / "sub" / "r.json").read_text())
    assert on_disk == written and next(iter(on_disk)) == "environment" and on_disk["rows"] == rows
    with open(tmp_path / "sub" / "r.csv") as f:
        table = list(csv.DictReader(f))
    assert [list(r) for r in table] == [["a", "b", "c"]] * 2
    assert table[1] == {"a": "2", "b": "", "c": "x"}


def test_plot_writes_a_png(tmp_path):
    rows = [dict(x=x, y=x * x, lo=x * x - 1, hi=x * x + 1, g=g) for g in ("p", "q") for x in (1, 2, 4)]
    harness.plot(tmp_path / "p.png", rows, x="x", y="y", group="g", err=("lo", "hi"), logx=True)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_train_bench_runs_as_documented_without_out():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_bench.py"), "--quick", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sm_step_over_binary" in result.stdout
