"""`python -m softmask_ext.pretrain --family mdlm`: a new DiT trained binary, SM continued pretraining of it with
`--model`, the result sampled and evaluated by `generate` and `evaluate`; the run folder's refusals and an exact
`--resume`; bad inputs as one-line errors; and (slow) two torchrun processes under FSDP equal to one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _training_helpers import CODE
from safetensors.torch import load_file

from softmask_ext import evaluate, generate, pretrain
from softmask_ext.conventions import MODEL_WEIGHTS, SHIPPED_MODEL
from softmask_ext.data import train_tokenizer
from softmask_ext.model import load_model
from softmask_ext.model.mdlm import MDLMModel
from softmask_ext.soft_mask import CONFIG_FILENAME
from softmask_ext.training.mdlm_trainer import MDLMTrainer

MDLM = ["--family", "mdlm"]
TINY = ["--hidden", "32", "--blocks", "1", "--heads", "2", "--length", "32", "--cond-dim", "16", "--dropout", "0"]
STEPS = ["--max-steps", "4", "--batch-size", "4", "--warmup-steps", "1", "--ema", "0.9", "--eval-batches", "1"]
# A checkpoint at step 2 of 4, so that a run killed after step 3 resumes from the middle.
SCRATCH = [*MDLM, *TINY, *STEPS, "--max-chars", "30000", "--save-every", "2", "--device", "cpu"]


class Killed(Exception):
    """Stands for a kill: not an error the CLI turns into a message."""


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A new DiT pretrained binary from the stdlib corpus (the run folder)."""
    run = tmp_path_factory.mktemp("mdlm-pretrain") / "scratch"
    pretrain.main([*SCRATCH, "--output", str(run)])
    return run


def test_a_new_dit_is_pretrained_into_an_mdlm_checkpoint(scratch):
    final = scratch / "final"
    config = json.loads((final / "config.json").read_text())
    shipped = json.loads((SHIPPED_MODEL / "tokenizer_config.json").read_text())["special_token_ids"]
    assert config["model_type"] == "mdlm" and (config["hidden_dim"], config["model_length"]) == (32, 32)
    assert (config["vocab_size"], config["mask_token_id"]) == (512, shipped["mask"])  # the shipped BPE, its mask
    assert (final / "tokenizer.json").is_file() and not (final / CONFIG_FILENAME).exists()  # binary: no SM config
    assert [m["step"] for m in _metrics(scratch)] == [1, 2, 3, 4]
    summary = json.loads((scratch / "summary.json").read_text())
    assert summary["config"]["lr"] == 3e-4 and summary["config"]["sm_prob"] == 0.0  # the preset's, not overridden
    # final/ holds the EMA of the weights, not the last weights.
    last = load_file(str(scratch / "checkpoints" / "step-00000004" / MODEL_WEIGHTS))
    ema = load_file(str(scratch / "checkpoints" / "step-00000004" / "ema.safetensors"))
    written = load_file(str(final / MODEL_WEIGHTS))
    name = "backbone.output_layer.linear.weight"
    assert torch.equal(written[name], ema[f"shadow.{name}"]) and not torch.equal(written[name], last[name])
    assert isinstance(load_model(final), MDLMModel)


def test_sm_continued_pretraining_from_the_checkpoint_then_generate_and_evaluate(scratch, tmp_path, capsys):
    text = tmp_path / "code.txt"
    text.write_text("".join(CODE) * 8)
    records = tmp_path / "more.jsonl"
    records.write_text("".join(json.dumps({"text": code}) + "\n" for code in CODE))
    run = tmp_path / "sm"
    model = ["--model", str(scratch / "final"), "--preset", "mdlm-sm-paper", "--sm-lr", "0.1"]
    data = ["--data", str(text), str(records), "--val-fraction", "0.2"]
    summary = pretrain.main([*MDLM, *model, *data, *STEPS, "--output", str(run), "--device", "cpu"])
    assert summary["config"]["sm_prob"] == 0.8 and summary["config"]["sm_lr"] == 0.1
    assert "SM)" in capsys.readouterr().out  # the validation ran with SM
    final = run / "final"
    assert json.loads((final / CONFIG_FILENAME).read_text())["mixinputs_k"] == 3
    assert json.loads((final / "config.json").read_text()) == json.loads(
        (scratch / "final" / "config.json").read_text()
    )
    assert generate.main(["--model", str(final), "--prompt", "", "--max-new-tokens", "16", "--steps", "4"]) == 0
    assert capsys.readouterr().out.strip()
    report = evaluate.main(
        ["--model", str(final), "--task", "ppl", "--limit", "2", "--num-samples", "1", "--out", str(tmp_path / "ev")]
    )
    assert report["soft_mask"]["mixinputs_k"] == 3  # the run's SM config, found beside the weights
    assert report["results"]["tokens"] == 64 and report["results"]["perplexity"] > 1


def test_the_run_folder_is_refused_or_resumed_exactly(scratch, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="already holds a run: continue it with --resume, replace it with --overwrite"):
        pretrain.main([*SCRATCH, "--output", str(scratch)])
    with pytest.raises(SystemExit) as finished:
        pretrain.main([*SCRATCH, "--output", str(scratch), "--resume"])
    assert finished.value.code == 0 and "has finished" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot resume .*: it is empty"):
        pretrain.main([*SCRATCH, "--output", str(tmp_path / "none"), "--resume"])

    # The same run killed after step 3 (its checkpoint is step 2), then resumed: the same metrics and model.
    run = tmp_path / "killed"
    train_step = MDLMTrainer.train_step

    def killed_after_step_3(trainer):
        if trainer.step == 3:
            raise Killed
        return train_step(trainer)

    monkeypatch.setattr(MDLMTrainer, "train_step", killed_after_step_3)
    with pytest.raises(Killed):
        pretrain.main([*SCRATCH, "--output", str(run)])
    monkeypatch.undo()
    assert len(_metrics(run)) == 3
    with pytest.raises(SystemExit, match=r"differs from its train_config.json in lr \(0.0003 there, 0.001 now\)"):
        pretrain.main([*SCRATCH, "--output", str(run), "--resume", "--lr", "1e-3"])
    pretrain.main([*SCRATCH, "--output", str(run), "--resume"])
    assert _metrics(run) == _metrics(scratch)
    resumed, straight = (load_file(str(r / "final" / MODEL_WEIGHTS)) for r in (run, scratch))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_bad_inputs_are_one_line_errors(scratch, tmp_path, capsys):
    out = ["--output", str(tmp_path / "run")]
    small = tmp_path / "small.json"
    train_tokenizer(CODE, vocab_size=300).save(str(small))
    continued = [*MDLM, "--model", str(scratch / "final"), "--max-steps", "1", *out]
    with pytest.raises(SystemExit, match=r"^error: the tokenizer does not fit --model .*has 300 ids but the model's"):
        pretrain.main([*continued, "--tokenizer", str(small)])
    with pytest.raises(SystemExit, match=r"^error: --model .* is a Dream checkpoint; --family mdlm trains MDLM"):
        pretrain.main([*MDLM, "--model", str(SHIPPED_MODEL), "--max-steps", "1", *out])
    with pytest.raises(SystemExit, match=r"^error: FSDP shards the model across processes, and this is a single"):
        pretrain.main([*MDLM, *TINY, "--max-steps", "1", "--fsdp", *out])
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(SystemExit, match=r"^error: .*chat.jsonl.*text"):
        pretrain.main([*MDLM, *TINY, "--max-steps", "1", "--data", str(chat), "--device", "cpu", *out])
    for argv, message in (
        (["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
        (["--model", str(scratch / "final"), "--hidden", "64"], "--hidden describe a new DiT; --model continues"),
    ):
        with pytest.raises(SystemExit) as usage:
            pretrain.main([*MDLM, "--max-steps", "1", *out, *argv])
        assert usage.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # a refused command writes nothing


def test_help_shows_each_presets_values(capsys):
    with pytest.raises(SystemExit):
        pretrain.main([*MDLM, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(presets: mdlm-pretrain 0.0, mdlm-sm-paper 0.8)" in help_text  # --sm-prob
    assert "--hidden N width (default: 768)" in help_text  # MDLM's 169M model
    assert "(default: None)" not in help_text


@pytest.mark.slow
def test_two_torchrun_processes_under_fsdp_equal_one_process(tmp_path):
    argv = [*SCRATCH, "--seed", "1"]
    pretrain.main([*argv, "--grad-accum", "2", "--output", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launch, "-m", "softmask_ext.pretrain", *argv, "--fsdp", "--output", str(tmp_path / "fsdp")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FSDP over 2 processes" in done.stdout
    one, fsdp = _metrics(tmp_path / "one"), _metrics(tmp_path / "fsdp")
    assert [m["loss"] for m in fsdp] == pytest.approx([m["loss"] for m in one], rel=1e-6)
    a, b = (load_file(str(tmp_path / r / "final" / MODEL_WEIGHTS)) for r in ("one", "fsdp"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
