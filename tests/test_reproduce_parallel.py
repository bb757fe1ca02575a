"""experiments/reproduce_parallel.py: its statistics, its settings, and the whole pipeline on a tiny configuration."""

import importlib.util
import json
from pathlib import Path

import pytest

from softmask_ext.data.parallel_task import SpellingTask

PATH = Path(__file__).resolve().parents[1] / "experiments" / "reproduce_parallel.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("reproduce_parallel", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("df", "expected"), [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (200, 1.972)])
def test_t_quantile_matches_the_table(bench, df, expected):
    assert bench.t_quantile(0.975, df) == pytest.approx(expected, abs=2e-3)


def test_mean_interval_is_a_t_interval_over_seeds(bench):
    out = bench.mean_interval([0.1, 0.2, 0.3, 0.4, 0.5])
    assert out["mean"] == pytest.approx(0.3)
    half = 2.776 * 0.158114 / 5**0.5
    assert out["ci95"] == pytest.approx([0.3 - half, 0.3 + half], abs=1e-3)


def test_settings(bench):
    args = bench.parse_args(["--steps", "150", "--sm-prob", "0.5"])
    assert bench.condition_settings(args, "binary") == (0.0, 150)
    assert bench.condition_settings(args, "sm_same_updates") == (0.5, 150)
    assert bench.condition_settings(args, "sm_same_compute") == (0.5, 100)
    assert bench.condition_settings(args, "binary_same_compute") == (0.0, 100)
    assert bench.tokens_per_step(SpellingTask.generate()) == (1, 2, 4, 8, 16)
    assert bench.tokens_per_step(SpellingTask.generate(word_length=3, prompt_words=4)) == (1, 2, 4)


@pytest.mark.parametrize(
    "argv", [["--seeds", "0"], ["--seeds", "0,0"], ["--seeds", "0,1000"], ["--sm-prob", "0"], ["--threads", "0"]]
)
def test_bad_arguments_are_refused(bench, argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_verdicts_read_the_intervals(bench):
    tps = (1, 2, 4, 8, 16)
    summary = {"binary": {str(t): {"valid": {"mean": 1.0 / t}} for t in tps}}
    paired = {
        f"{sm} - {b}": {
            str(t): {"mean": d, "ci95": [d - 0.01, d + 0.01]} for t, d in zip(tps, (0.0, 0.05, -0.05, 0.0, 0.0))
        }
        for sm, b in bench.COMPARISONS
    }
    lines = bench.verdicts(summary, paired, tps, (0, 1, 2))
    assert "requirement >= 50%: met" in lines[0] and "fall of 87.5 points (requirement >= 10: met)" in lines[1]
    words = [line.rsplit(": ", 1)[1] for line in lines[2:7]]
    assert words == [
        "no difference detected",
        "SM better",
        "SM worse",
        "no difference detected",
        "no difference detected",
    ]


def test_pipeline_end_to_end_on_a_tiny_configuration(bench, tmp_path):
    """Every stage (base, learning-rate choice, conditions, statistics, JSON, plot, cache) on a model too small and
    too briefly trained to learn the task: the --quick path runs the same code with larger numbers."""
    argv = [
        "--seeds",
        "0,1",
        "--base-steps",
        "3",
        "--steps",
        "2",
        "--lr-grid",
        "1e-3,3e-3",
        "--sm-lr-grid",
        "0.1",
        "--train-size",
        "64",
        "--val-size",
        "8",
        "--test-size",
        "8",
        "--hidden-size",
        "16",
        "--layers",
        "1",
        "--batch-size",
        "8",
        "--work-dir",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
        "--name",
        "tiny",
    ]
    report = bench.main(argv)
    saved = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert (tmp_path / "out" / "tiny.png").stat().st_size > 0
    assert saved["verdicts"] == report["verdicts"] and len(saved["verdicts"]) == 2 + 3 * 5
    chosen = saved["hyperparameters"]["chosen_on_validation"]
    assert set(chosen) == set(bench.CONDITIONS) and chosen["binary"]["lr"] in (1e-3, 3e-3)
    assert chosen["sm_same_updates"] == chosen["sm_same_compute"] == {"lr": chosen["binary"]["lr"], "sm_lr": 0.1}
    assert chosen["binary_same_compute"] == chosen["binary"]
    for condition in bench.CONDITIONS:
        for t in ("1", "2", "4", "8", "16"):
            valid = saved["summary"][condition][t]["valid"]
            assert 0.0 <= valid["mean"] <= 1.0 and valid["ci95"][0] <= valid["mean"] <= valid["ci95"][1]
    assert saved["conditions"]["sm_same_compute"] == {"sm_prob": 0.5, "updates": 1}
    assert saved["conditions"]["binary_same_compute"] == {"sm_prob": 0.0, "updates": 1}
    assert set(saved["paired_sm_minus_binary"]) == {
        "sm_same_updates - binary",
        "sm_same_compute - binary",
        "sm_same_compute - binary_same_compute",
    }
    for condition in bench.SM_CONDITIONS:
        assert set(saved["learned_soft_mask"][condition]) == {"0", "1"}
        assert saved["learned_soft_mask"][condition]["0"]["transparency_alg"] == "mixinputs_with_topk"
    # Every run's evaluation is cached under its settings: a rerun reads it back instead of training again.
    args = bench.parse_args(argv)
    task = SpellingTask.generate(args.task_seed)
    test = task.sample("test", args.test_size, seed=0)
    cached = bench.run_condition(
        args, task, [], args.work_dir / "base" / "final", "sm_same_updates", 1, chosen["sm_same_updates"], test, "test"
    )
    assert cached["validity"] == saved["per_seed_validity"]["sm_same_updates"]["1"]


@pytest.mark.slow
def test_quick_mode_end_to_end(bench, tmp_path):
    report = bench.main(["--quick", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "reproduce_parallel_quick.json").exists()
    assert (tmp_path / "out" / "reproduce_parallel_quick.png").exists()
    assert len(report["per_seed_validity"]["binary"]) == 3
