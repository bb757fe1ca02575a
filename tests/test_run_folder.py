"""Run folders hold one run: refused starts write nothing, default checkpoints, resume from the latest good one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _training_helpers import CODE, make_model_dir, random_examples, tiny_model

from softmask_ext.finetune import SHIPPED_MODEL, main
from softmask_ext.training import (
    RunFinished,
    RunFolderError,
    TrainConfig,
    Trainer,
    check_free_space,
    check_run_folder,
    check_writable,
    read_metrics,
    truncate_metrics,
)

DATA = random_examples(32, seed=1)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _trainer(run_dir: Path, **overrides) -> Trainer:
    fields = dict(run_dir=str(run_dir), max_steps=20, batch_size=4, lr=3e-3, sm_lr=0.1, sm_prob=0.5, eval_batches=1)
    return Trainer(tiny_model(), DATA, TrainConfig(**{**fields, **overrides}), val_data=DATA[:4], device="cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"Show code {i}.", "response": code}) + "\n" for i, code in enumerate(CODE))
    )
    return path


def _cli(model_dir: Path, data_file: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(model_dir),
        "--data",
        str(data_file),
        "--output-dir",
        str(out),
        "--name",
        "run",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "128",
        "--eval-batches",
        "1",
        "--device",
        "cpu",
        *extra,
    ]


def test_a_second_run_into_the_same_folder_is_refused_and_changes_nothing(model_dir, data_file, tmp_path, capsys):
    main(_cli(model_dir, data_file, tmp_path))
    run = tmp_path / "run"
    before = _snapshot(run)
    with pytest.raises(SystemExit, match=r"already holds a run.*--resume.*--overwrite"):
        main(_cli(model_dir, data_file, tmp_path, "--lr", "1e-3"))
    assert _snapshot(run) == before
    # --resume of the finished run says so, exits 0 and changes nothing.
    with pytest.raises(SystemExit) as finished:
        main(_cli(model_dir, data_file, tmp_path, "--resume"))
    assert finished.value.code == 0
    assert "has finished" in capsys.readouterr().err
    assert _snapshot(run) == before
    # --overwrite replaces it: one run's lines in metrics.jsonl, its own final checkpoint.
    main(_cli(model_dir, data_file, tmp_path, "--overwrite", "--max-steps", "3"))
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((run / "train_config.json").read_text())["max_steps"] == 3
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000003"


def test_resume_without_a_checkpoint_is_refused_and_writes_nothing(model_dir, data_file, tmp_path):
    with pytest.raises(SystemExit, match=r"cannot resume .*empty.*--overwrite"):
        main(_cli(model_dir, data_file, tmp_path, "--resume"))
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit, match=r"holds no checkpoint.*--overwrite"):
        main(_cli(model_dir, data_file, tmp_path, "--resume"))
    with pytest.raises(SystemExit, match="exclude each other"):
        main(_cli(model_dir, data_file, tmp_path, "--resume", "--overwrite"))


def test_a_refused_resume_leaves_the_run_as_it_was(tmp_path):
    _trainer(tmp_path, save_every=2).train(stop_at_step=4)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="batch_size=4, this run has batch_size=2"):
        _trainer(tmp_path, save_every=2, batch_size=2).resume()
    assert _snapshot(tmp_path) == before


def test_the_trainer_refuses_a_fresh_start_over_another_run(tmp_path):
    _trainer(tmp_path, max_steps=2).train()
    with pytest.raises(RunFolderError, match="already holds a run"):
        _trainer(tmp_path, max_steps=2).train()


def test_default_checkpoints_every_tenth_of_the_steps_and_keep_bounds_them(tmp_path):
    assert TrainConfig(run_dir="x", max_steps=600).checkpoint_every == 60
    assert TrainConfig(run_dir="x", max_steps=7).checkpoint_every == 1
    trainer = _trainer(tmp_path / "a", keep_checkpoints=20)
    trainer.train(stop_at_step=9)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step-*")) == [
        f"step-{s:08d}" for s in (2, 4, 6, 8, 9)
    ]
    _trainer(tmp_path / "b", keep_checkpoints=2).train(stop_at_step=9)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("step-*")) == ["step-00000008", "step-00000009"]
    with pytest.raises(ValueError, match="keep_checkpoints >= 1"):
        TrainConfig(run_dir="x", max_steps=2, keep_checkpoints=0)


def test_time_based_checkpoints(tmp_path):
    _trainer(tmp_path, save_every=0, save_interval_s=1e-9, keep_checkpoints=10).train(stop_at_step=3)
    assert len(list((tmp_path / "checkpoints").glob("step-*"))) == 3


def test_resume_falls_back_past_a_damaged_checkpoint_and_a_torn_metrics_line(tmp_path, capsys):
    _trainer(tmp_path, save_every=2).train(stop_at_step=6)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.2')  # a kill mid-write
    optimizer = tmp_path / "checkpoints" / "step-00000006" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    trainer = _trainer(tmp_path, save_every=2)
    assert trainer.resume() and trainer.step == 4
    assert trainer.resumed_from.name == "step-00000004"
    err = capsys.readouterr().err
    assert "skipping a damaged checkpoint" in err and "step-00000006" in err
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    summary = trainer.train()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 21))
    assert "val_binary" in summary


def test_every_checkpoint_damaged_is_an_error(tmp_path):
    _trainer(tmp_path, save_every=2).train(stop_at_step=4)
    for manifest in (tmp_path / "checkpoints").glob("step-*/manifest.json"):
        manifest.write_text("{")
    with pytest.raises(RunFolderError, match="every one is damaged"):
        _trainer(tmp_path, save_every=2).resume()


def test_resume_after_a_kill_while_finishing_completes_the_summary(model_dir, data_file, tmp_path):
    main(_cli(model_dir, data_file, tmp_path))
    (tmp_path / "run" / "summary.json").unlink()  # killed after the last checkpoint, before the summary
    summary = main(_cli(model_dir, data_file, tmp_path, "--resume"))
    assert summary["step"] == 2 and "val_binary" in summary and "val_soft_mask" in summary
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_metrics_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert truncate_metrics(path, 2) == 1 and path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(RunFolderError, match=r"metrics\.jsonl, line 2"):
        read_metrics(path)


def test_folder_checks_write_nothing(tmp_path):
    check_run_folder(tmp_path / "new")
    check_writable(tmp_path / "new" / "deeper")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "run")
    with pytest.raises(RunFolderError, match="no space left for this run.*MiB free"):
        check_free_space(tmp_path, 1 << 62, "the checkpoints")
    check_free_space(tmp_path, 1, "the checkpoints")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "summary.json").write_text("{}")
    with pytest.raises(RunFinished, match="has finished"):
        check_run_folder(tmp_path / "done", resume=True)


@pytest.mark.skipif(not (SHIPPED_MODEL / "model.safetensors").exists(), reason="the tiny model has not been built yet")
def test_a_killed_default_run_resumes_from_its_latest_checkpoint(tmp_path, capsys):
    """The shipped model with the default checkpoint settings (fewer steps and a corpus slice, for time): SIGKILL as
    soon as the first checkpoint exists, then --resume continues from it and finishes with one line per step."""
    argv = [
        "--output-dir",
        str(tmp_path),
        "--max-steps",
        "20",
        "--batch-size",
        "2",
        "--eval-batches",
        "1",
        "--max-chars",
        "200000",
        "--device",
        "cpu",
    ]
    run = tmp_path / f"{SHIPPED_MODEL.name}-sm"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "softmask_ext.finetune", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "latest").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run / "summary.json").exists()
    checkpoint = (run / "checkpoints" / "latest").read_text().strip()
    step = int(checkpoint.removeprefix("step-"))
    assert step % 2 == 0 and 2 <= step < 20  # a checkpoint every 10% of the 20 steps
    summary = main([*argv, "--resume"])
    assert f"resuming from step {step} of 20" in capsys.readouterr().out
    assert summary["step"] == 20 and "val_binary" in summary
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 21))
