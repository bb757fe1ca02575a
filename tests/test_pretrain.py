"""`python -m softmask_ext.pretrain` end to end on a sliver of the corpus, and the shipped model it produced."""

from __future__ import annotations

import json
import math

import pytest
import torch

from softmask_ext.conventions import SHIPPED_MODEL
from softmask_ext.model import DreamConfig, DreamModel, load_tokenizer
from softmask_ext.pretrain import MAX_WEIGHT_BYTES, main, unigram_cross_entropy


def test_unigram_cross_entropy_matches_the_definition():
    train = torch.tensor([0, 0, 0, 1])  # smoothed counts 4, 2, 1 over a vocabulary of 3
    val = torch.tensor([0, 1, 2])
    expected = -(math.log(4 / 7) + math.log(2 / 7) + math.log(1 / 7)) / 3
    assert unigram_cross_entropy(train, val, 3) == pytest.approx(expected)


def test_pretrain_writes_a_loadable_dream_model_directory(tmp_path):
    out = tmp_path / "model"
    metadata = main(
        [
            "--output",
            str(out),
            "--work-dir",
            str(tmp_path / "run"),
            "--max-chars",
            "150000",
            "--vocab-size",
            "400",
            "--hidden-size",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--intermediate-size",
            "64",
            "--seq-len",
            "64",
            "--batch-size",
            "4",
            "--max-steps",
            "3",
            "--eval-batches",
            "2",
            "--save-every",
            "2",
        ]
    )
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "Dream" and config["vocab_size"] == 400
    model = DreamModel.from_pretrained(out)
    tokenizer = load_tokenizer(out)
    assert tokenizer.mask_token_id == model.config.mask_token_id
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")
    saved = json.loads((out / "metadata.json").read_text())
    assert saved == metadata
    assert {"heldout_loss_nats", "unigram_baseline_nats", "total_seconds", "parameters"} <= saved.keys()
    assert "nats" in (out / "README.md").read_text()


@pytest.mark.skipif(not (SHIPPED_MODEL / "model.safetensors").exists(), reason="the tiny model has not been built yet")
def test_shipped_model_is_small_trained_and_complete():
    assert (SHIPPED_MODEL / "model.safetensors").stat().st_size <= MAX_WEIGHT_BYTES
    config = DreamConfig.from_pretrained(SHIPPED_MODEL)
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    assert len(tokenizer) == config.vocab_size and tokenizer.chat_template
    metadata = json.loads((SHIPPED_MODEL / "metadata.json").read_text())
    # Measurably trained: clearly below a model that ignores context.
    assert metadata["heldout_loss_nats"] < metadata["unigram_baseline_nats"] - 0.5
