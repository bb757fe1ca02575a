"""The command-line tools on a tiny LLaDA checkpoint: finetune (SM two-pass, LoRA/DoRA on LLaDA's modules) ->
generate -> evaluate, and a checkpoint of no supported family through each tool."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from _training_helpers import CODE
from tiny_llada import make_checkpoint_with_tokenizer

from softmask_ext import generate, load_model
from softmask_ext.evaluate import main as evaluate_main
from softmask_ext.finetune import SHIPPED_MODEL
from softmask_ext.finetune import main as finetune_main
from softmask_ext.model import LLaDAModel

TRAIN = ["--max-steps", "2", "--batch-size", "2", "--max-length", "96", "--eval-batches", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llada")
    make_checkpoint_with_tokenizer(path, SHIPPED_MODEL)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as f:
        for i, code in enumerate(CODE):
            f.write(json.dumps({"prompt": f"Show code {i % 5}.", "response": code}) + "\n")
    return path


@pytest.fixture(scope="module")
def adapters(llada_dir, data_file, tmp_path_factory):
    """A DoRA soft-masking run on the LLaDA checkpoint; returns (summary, final folder)."""
    out = tmp_path_factory.mktemp("runs")
    summary = finetune_main(
        [
            "--model",
            str(llada_dir),
            "--data",
            str(data_file),
            "--output-dir",
            str(out),
            "--name",
            "dora",
            "--dora",
            "--rank",
            "4",
            "--alpha",
            "8",
            "--sm-prob",
            "1",
            *TRAIN,
        ]
    )
    return summary, out / "dora" / "final"


def test_finetune_trains_soft_masking_with_adapters_on_llada_modules(adapters):
    summary, final = adapters
    config = json.loads((final / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["attn_out", "k_proj", "q_proj", "v_proj"] and config["use_dora"]
    assert summary["val_soft_mask"] is not None and summary["val_binary"] is not None
    assert (final / "transparency_config.json").exists()
    model = load_model(final)
    assert isinstance(model, LLaDAModel) and model.family.logit_shift == 0


def test_generate_and_evaluate_run_on_the_fine_tuned_llada(adapters, tmp_path, capsys):
    _, final = adapters
    assert (
        generate.main(
            [
                "--model",
                str(final),
                "--prompt",
                "def add(a, b):",
                "--max-new-tokens",
                "8",
                "--steps",
                "4",
                "--temperature",
                "0",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "using the soft-mask config" in capsys.readouterr().err
    elbo = evaluate_main(
        [
            "--model",
            str(final),
            "--task",
            "elbo",
            "--limit",
            "2",
            "--num-samples",
            "2",
            "--max-length",
            "32",
            "--out",
            str(tmp_path / "elbo"),
            "--quiet",
        ]
    )
    assert set(elbo["results"]) == {"binary", "soft_mask", "soft_mask_minus_binary"}
    infill = evaluate_main(
        [
            "--model",
            str(final),
            "--task",
            "infill",
            "--limit",
            "1",
            "--span-length",
            "4",
            "--tokens-per-step",
            "2",
            "--out",
            str(tmp_path / "infill"),
            "--quiet",
        ]
    )
    assert set(infill["results"]) == {"binary", "soft_mask"}


def test_a_checkpoint_of_no_supported_family_is_one_clear_error_in_every_tool(tmp_path, data_file):
    folder = tmp_path / "gpt"
    shutil.copytree(SHIPPED_MODEL, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    message = "no model family handles model_type 'gpt_neox'; supported: dream (Dream, qwen2), llada (llada, LLaDA)"
    for run in (
        lambda: finetune_main(["--model", str(folder), "--data", str(data_file), *TRAIN]),
        lambda: generate.main(["--model", str(folder), "--prompt", "x", "--device", "cpu"]),
        lambda: evaluate_main(["--model", str(folder), "--task", "elbo", "--quiet"]),
    ):
        with pytest.raises(SystemExit, match=re.escape(message)):
            run()
