"""Adapter folders (what a LoRA/DoRA fine-tuning run writes) load as their base model with the adapters merged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _training_helpers import make_model_dir

from softmask_ext import evaluate, generate
from softmask_ext.model import DreamModel
from softmask_ext.training import AdapterConfig, apply_adapters

IDS = torch.randint(0, 299, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("base"))


def write_adapters(
    base_dir: Path, path: Path, kind: str, targets: tuple[str, ...] = AdapterConfig().targets
) -> torch.Tensor:
    """Adapters with non-zero weights on ``base_dir``, saved as fine-tuning saves them (plus the tokenizer, as a run's
    final folder has it); returns the logits of the unmerged adapter model on ``IDS``."""
    config = AdapterConfig(kind=kind, rank=4, alpha=8.0, targets=targets)
    model = apply_adapters(DreamModel.from_pretrained(base_dir), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # lora_B starts at zero: move every adapter tensor
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        expected = model(input_ids=IDS).logits
    model.save_pretrained(path)
    for f in base_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, path)
    return expected


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapters_are_merged_into_their_base(base_dir, tmp_path, kind):
    expected = write_adapters(base_dir, tmp_path, kind)
    merged = DreamModel.from_pretrained(tmp_path)
    assert type(merged) is DreamModel and not merged.training
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        logits = merged(input_ids=IDS).logits
        base = DreamModel.from_pretrained(base_dir)(input_ids=IDS).logits
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)
    assert (logits - base).abs().max() > 1e-2  # the adapters changed the model


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")  # peft saving such adapters
@pytest.mark.parametrize("targets", [("q_proj", "lm_head"), ("embed_tokens",)])
def test_adapters_on_a_tied_table_are_merged_apart(tmp_path, targets):
    """With tied input and output embeddings, an adapter on one end must not reach the other: the merged model
    unties them, as the adapted model has them."""
    base = tmp_path / "tied"
    make_model_dir(base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tied = DreamModel(DreamModel.from_pretrained(base).config)  # fresh weights, one table for both ends
    tied.save_pretrained(base)
    expected = write_adapters(base, tmp_path / "adapters", "lora", targets)
    merged = DreamModel.from_pretrained(tmp_path / "adapters")
    assert not merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() != merged.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, atol=2e-5, rtol=1e-5)


def test_moved_base_is_named_and_can_be_given(base_dir, tmp_path):
    moved = tmp_path / "moved-base"
    shutil.copytree(base_dir, moved)
    adapters = tmp_path / "adapters"
    expected = write_adapters(moved, adapters, "lora")
    shutil.rmtree(moved)
    with pytest.raises(FileNotFoundError, match="moved-base.*base_model="):
        DreamModel.from_pretrained(adapters)
    merged = DreamModel.from_pretrained(adapters, base_model=base_dir)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, atol=2e-5, rtol=1e-5)


def test_bad_adapter_folders(base_dir, tmp_path):
    write_adapters(base_dir, tmp_path, "lora")
    with pytest.raises(ValueError, match="base_model is for adapter folders"):
        DreamModel.from_pretrained(base_dir, base_model=base_dir)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        DreamModel.from_pretrained(tmp_path)


def test_clis_take_an_adapter_folder(base_dir, tmp_path, capsys):
    adapters = tmp_path / "final"
    write_adapters(base_dir, adapters, "dora")
    generate.main(
        [
            "--model",
            str(adapters),
            "--prompt",
            "def f(x):",
            "--max-new-tokens",
            "8",
            "--steps",
            "4",
            "--temperature",
            "0",
            "--device",
            "cpu",
            "--no-chat-template",
        ]
    )
    assert capsys.readouterr().out.strip()
    report = evaluate.main(
        [
            "--model",
            str(adapters),
            "--task",
            "elbo",
            "--limit",
            "2",
            "--num-samples",
            "2",
            "--out",
            str(tmp_path / "eval"),
            "--soft-mask",
            "none",
        ]
    )
    assert report["results"]["binary"]["nll_bound"] > 0
    with pytest.raises(SystemExit, match="error: the adapters in .* belong to the base model"):
        evaluate.main(["--model", str(adapters), "--task", "elbo", "--base-model", str(tmp_path / "nowhere")])
