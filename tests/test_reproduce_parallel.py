"""experiments/reproduce_parallel.py: its statistics, its settings, and the whole pipeline on a tiny configuration."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

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
    "argv",
    [
        ["--seeds", "0"],
        ["--seeds", "0,0"],
        ["--seeds", "0,1000"],
        ["--sm-prob", "0"],
        ["--threads", "0"],
        ["--thresholds", "0,0.5"],
        ["--thresholds", "0.5,1.5"],
        ["--thresholds", "0.5,0.5"],
    ],
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


def _per_seed(values: dict[str, list[float]], speeds: dict[str, list[float]]) -> dict:
    """A threshold sweep's per-seed results at one threshold (0.5), over seeds 0-2: condition -> per-seed values."""
    return {
        c: {
            s: {"threshold": {"0.5": {"valid": v, "tokens_per_step": t}}} for s, (v, t) in enumerate(zip(vs, speeds[c]))
        }
        for c, vs in values.items()
    }


def test_threshold_statistics_are_over_seeds_and_paired(bench):
    valid = {"binary": [0.5, 0.6, 0.7], "sm_same_updates": [0.6, 0.75, 0.8]}
    speed = {"binary": [2.0, 3.0, 4.0], "sm_same_updates": [2.0, 3.0, 4.0]}
    per_seed = _per_seed(valid, speed)
    summary = bench.summarise(per_seed, (0.5,), (0, 1, 2), "threshold", ("valid", "tokens_per_step"))
    assert summary["binary"]["0.5"]["valid"] == bench.mean_interval([0.5, 0.6, 0.7])
    assert summary["sm_same_updates"]["0.5"]["tokens_per_step"]["mean"] == pytest.approx(3.0)
    per_seed["sm_same_compute"] = per_seed["binary_same_compute"] = per_seed["binary"]
    paired = bench.paired_differences(per_seed, (0.5,), (0, 1, 2), "threshold", "valid")
    # Paired seed by seed: the differences 0.1, 0.15, 0.1 lie above zero; the two means' own intervals overlap.
    assert paired["sm_same_updates - binary"]["0.5"]["per_seed"] == pytest.approx([0.1, 0.15, 0.1])
    assert paired["sm_same_updates - binary"]["0.5"]["ci95"][0] > 0
    assert summary["sm_same_updates"]["0.5"]["valid"]["ci95"][0] < summary["binary"]["0.5"]["valid"]["ci95"][1]
    assert paired["sm_same_compute - binary_same_compute"]["0.5"]["per_seed"] == [0.0, 0.0, 0.0]
    speeds = bench.paired_differences(per_seed, (0.5,), (0, 1, 2), "threshold", "tokens_per_step")
    assert speeds["sm_same_updates - binary"]["0.5"]["per_seed"] == [0.0, 0.0, 0.0]


def test_threshold_verdicts_read_validity_and_tokens_per_step(bench):
    def interval(d):
        return {"mean": d, "ci95": [d - 0.01, d + 0.01]}

    thresholds = (0.5, 0.9)
    summary = {"binary": {"0.5": {"valid": {"mean": 0.4}, "tokens_per_step": {"mean": 4.0}}}}
    summary["binary"]["0.9"] = {"valid": {"mean": 0.95}, "tokens_per_step": {"mean": 1.5}}
    # Per comparison (validity, tokens/step) at 0.5 and at 0.9.
    cases = {
        "sm_same_updates - binary": ((0.05, 0.0), (0.0, 0.3)),
        "sm_same_compute - binary": ((-0.05, 0.0), (0.05, -0.3)),
        "sm_same_compute - binary_same_compute": ((0.0, 0.0), (0.0, -0.3)),
    }
    paired = {
        metric: {k: {str(t): interval(v[i]) for t, v in zip(thresholds, pairs)} for k, pairs in cases.items()}
        for i, metric in enumerate(("valid", "tokens_per_step"))
    }
    lines = bench.threshold_verdicts(summary, paired, thresholds, (0, 1, 2))
    assert lines[0].endswith("95.0% at 1.50 (threshold 0.9), 40.0% at 4.00 (threshold 0.5)")
    assert [line.rsplit(": ", 1)[1] for line in lines[1:]] == [
        "SM better",
        "SM better",
        "SM worse",
        "mixed (one better, one worse)",
        "no difference detected",
        "SM worse",
    ]
    assert "+5.0 points of validity [+4.0, +6.0], +0.00 tokens/step" in lines[1]
    table = bench.format_threshold_table(
        {c: {str(t): {"valid": interval(0.5), "tokens_per_step": interval(2.0)} for t in thresholds} for c in "ab"},
        paired,
        thresholds,
    )
    assert table.splitlines()[0] == "| condition | threshold 0.5 | threshold 0.9 |"
    assert "| a | 50.0 [49.0, 51.0] at 2.00 [1.99, 2.01] tok/step |" in table
    assert "| sm_same_compute - binary (paired) | -5.0 [-6.0, -4.0] at +0.00 [-0.01, +0.01] tok/step |" in table


def test_threshold_validity_counts_tokens_per_step(bench):
    """A threshold every letter passes decodes the answer in one step (16 tokens per step, the same answers as one
    fixed step); one that an untrained model's confidences never reach decodes one letter per step."""
    task = SpellingTask.generate()
    args = bench.parse_args(["--hidden-size", "16", "--layers", "1"])
    torch.manual_seed(0)
    model = bench.DreamModel(bench.model_config(args, task)).eval()
    mask = model.config.mask_token_id
    # An untrained model may draw the mask token, which leaves a letter masked: rule that out.
    model.lm_head.register_forward_hook(lambda _m, _i, out: out.index_fill(-1, torch.tensor([mask]), -float("inf")))
    items = task.sample("test", 8, seed=0)
    every = bench.threshold_validity(model, task, items, 1e-9, None)
    assert every["tokens_per_step"] == 16.0
    one_step = bench.decode(model, task, items, None, steps=1, **bench.THRESHOLD_DECODING).sequences
    assert {k: every[k] for k in ("valid", "word_valid")} == bench.score(task, items, one_step)
    assert bench.threshold_validity(model, task, items, 1.0, None)["tokens_per_step"] == 1.0


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
        "--thresholds",
        "0.5,0.9",
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
    assert saved["verdicts"] == report["verdicts"] and len(saved["verdicts"]) == 2 + 3 * 5 + 1 + 3 * 2
    chosen = saved["hyperparameters"]["chosen_on_validation"]
    assert set(chosen) == set(bench.CONDITIONS) and chosen["binary"]["lr"] in (1e-3, 3e-3)
    assert chosen["sm_same_updates"] == chosen["sm_same_compute"] == {"lr": chosen["binary"]["lr"], "sm_lr": 0.1}
    assert chosen["binary_same_compute"] == chosen["binary"]
    for condition in bench.CONDITIONS:
        for t in ("1", "2", "4", "8", "16"):
            valid = saved["summary"][condition][t]["valid"]
            assert 0.0 <= valid["mean"] <= 1.0 and valid["ci95"][0] <= valid["mean"] <= valid["ci95"][1]
    _check_threshold_results(bench, saved, ("0.5", "0.9"))
    assert "threshold 0.5" in saved["table_markdown"]
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
    base = args.work_dir / "base" / "final"
    hyper = chosen["sm_same_updates"]
    cached = bench.run_condition(args, task, [], base, "sm_same_updates", 1, hyper, test, "test", args.thresholds)
    assert cached["validity"] == saved["per_seed_validity"]["sm_same_updates"]["1"]
    assert cached["threshold"] == saved["per_seed_threshold"]["sm_same_updates"]["1"]


def _check_threshold_results(bench, saved: dict, keys: tuple[str, ...]) -> None:
    """The threshold sweep is in the JSON: per condition and threshold, validity and tokens per step over seeds."""
    assert saved["threshold_decoding"]["alg"] == "maskgit_plus"
    for condition in bench.CONDITIONS:
        assert set(saved["threshold_summary"][condition]) == set(keys)
        for row in saved["threshold_summary"][condition].values():
            assert 0.0 <= row["valid"]["mean"] <= 1.0 and 0.0 < row["tokens_per_step"]["mean"] <= 16.0
            assert row["tokens_per_step"]["ci95"][0] <= row["tokens_per_step"]["mean"]
    for metric in ("valid", "tokens_per_step"):
        paired = saved["paired_sm_minus_binary_threshold"][metric]
        assert set(paired) == set(saved["paired_sm_minus_binary"])
        assert all(set(by_threshold) == set(keys) for by_threshold in paired.values())
    assert set(saved["base_model_validity"]["test_threshold"]) == set(keys)


@pytest.mark.slow
def test_quick_mode_end_to_end(bench, tmp_path):
    report = bench.main(["--quick", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "reproduce_parallel_quick.json").exists()
    assert (tmp_path / "out" / "reproduce_parallel_quick.png").exists()
    assert len(report["per_seed_validity"]["binary"]) == 3
    saved = json.loads((tmp_path / "out" / "reproduce_parallel_quick.json").read_text())
    _check_threshold_results(bench, saved, tuple(str(t) for t in bench.QUICK["thresholds"]))
