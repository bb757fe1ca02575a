"""The authors' Dream recipe (--preset dream-paper), point by point against small hand-computed cases."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _training_helpers import CODE, make_model_dir

from softmask_ext.data import (
    TOOL_CALL_TOKEN_IDS,
    BatchStream,
    Example,
    load_dataset,
    response_padding_length,
    save_tokenizer,
    train_tokenizer,
)
from softmask_ext.diffusion.noise import NoiseSchedule, apply_noise, sample_noise
from softmask_ext.diffusion.objective import masked_token_loss, sequence_mean_loss
from softmask_ext.finetune import main, parse_args, resolve_settings
from softmask_ext.model import DreamConfig, load_tokenizer
from softmask_ext.training.presets import PRESETS, drop_token_ids

LN2 = math.log(2.0)


def logits_for(probabilities: list[list[float]]) -> torch.Tensor:
    """[1, T, V] logits whose softmax rows are the given probabilities."""
    return torch.tensor(probabilities).log().unsqueeze(0)


def test_sequence_loss_is_one_over_t_times_each_sequences_mean_summed():
    """Sequence a (4 tokens, t = 0.5) has two masked tokens predicted with p = 1/2 and 1/4: (1/0.5) x mean(ln 2, ln 4)
    = 3 ln 2. Sequence b (2 real tokens + 2 of padding, t = 0.25) has one, p = 1/2: (1/0.25) x ln 2 = 4 ln 2."""
    p = [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5], [0.5, 0.25, 0.25]]
    logits = torch.cat([logits_for(p), logits_for(p)])
    targets = torch.tensor([[0, 0, 2, 1], [0, 0, 0, 0]])
    masked = torch.tensor([[True, True, False, False], [True, False, False, False]])
    t = torch.tensor([0.5, 0.25], dtype=torch.float64)
    total = sequence_mean_loss(logits, targets, masked, t, logit_shift=0)
    assert total.item() == pytest.approx(7 * LN2, rel=1e-6)
    # Summed over micro-batches of one sequence each (the authors' accumulation) it is the same number.
    parts = [
        sequence_mean_loss(logits[i : i + 1], targets[i : i + 1], masked[i : i + 1], t[i : i + 1], logit_shift=0)
        for i in range(2)
    ]
    assert parts[0].item() == pytest.approx(3 * LN2) and parts[1].item() == pytest.approx(4 * LN2)
    # The per-token normalisation (dream-tokens) with one t = 0.5 over the 6 response tokens weighs the two sequences
    # by their masked token counts instead: (ln 2 + ln 4 + ln 2) / 0.5 / 6.
    tokens = masked_token_loss(logits, targets, masked, 0.5, num_tokens=6, logit_shift=0)
    assert tokens.item() == pytest.approx(4 * LN2 / 0.5 / 6)
    with pytest.raises(ValueError, match="every row needs a masked token"):
        sequence_mean_loss(logits, targets, torch.zeros_like(masked), t, logit_shift=0)


def test_mask_probability_has_the_authors_floor_and_t_is_per_sequence():
    ids = torch.zeros(2, 200_000, dtype=torch.int64)
    response = torch.ones_like(ids, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    t = torch.tensor([1e-9, 0.5], dtype=torch.float64)
    noised = apply_noise(ids, response, 7, t, generator, mask_eps=1e-3)
    share = noised.masked.float().mean(1)
    assert share[0].item() == pytest.approx(1e-3, rel=0.15)  # (1 - 1e-3) * 0 + 1e-3
    assert share[1].item() == pytest.approx((1 - 1e-3) * 0.5 + 1e-3, rel=0.02)
    rows = sample_noise(
        torch.zeros(64, 8, dtype=torch.int64),
        torch.ones(64, 8, dtype=torch.bool),
        7,
        NoiseSchedule(0.2, 0.8),
        generator,
        per_sequence=True,
        mask_eps=1e-3,
    )
    assert rows.t.shape == (64,) and rows.t.unique().numel() == 64 and 0.2 <= rows.t.min() <= rows.t.max() <= 0.8
    assert bool(rows.masked.any(1).all())  # at least one masked token per sequence, as the authors' collator forces


def test_padding_is_trained_as_response_with_the_pad_token_as_label():
    pad = 9
    examples = [
        Example(torch.arange(10, 15), torch.tensor([True, True, False, False, False])),
        Example(torch.arange(20, 29), torch.tensor([True] * 3 + [False] * 6)),
    ]
    stream = BatchStream(examples, 2, pad, seed=0, pad_as_response=True)
    lengths = set()
    for _ in range(6):
        batch = next(stream)
        length = batch["input_ids"].shape[1]
        lengths.add(length)
        assert length % 8 == 0 and 16 <= length <= response_padding_length(9, 49) == 64
        for row in range(2):
            n = int((batch["input_ids"][row] != pad).sum())
            assert bool((batch["input_ids"][row, n:] == pad).all())
            assert not bool(batch["prompt_mask"][row, n:].any())  # padding may be noised: it is response
        assert bool(batch["attention_mask"].all())  # no attention mask, as the authors
        # Noised like response tokens, the padding's label is the pad token (the clean input).
        noised = apply_noise(batch["input_ids"], ~batch["prompt_mask"], 1, 1.0, torch.Generator().manual_seed(0))
        assert bool(noised.masked[:, -1].all()) and bool((batch["input_ids"][:, -1] == pad).all())
    assert len(lengths) > 1  # the extra length is drawn per batch
    assert response_padding_length(13, 0) == 16 and response_padding_length(16, 0) == 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(CODE, vocab_size=300), out)
    return load_tokenizer(out)


def test_last_message_is_the_response_and_short_or_tool_call_samples_are_dropped(tokenizer, tmp_path):
    conversation = {
        "messages": [
            {"role": "user", "content": "Add."},
            {"role": "assistant", "content": "def add(a, b):"},
            {"role": "user", "content": "Now class."},
            {"role": "assistant", "content": CODE[1]},
        ]
    }
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}]}
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (conversation, short)))
    every = load_dataset(data, tokenizer, 512)
    last = load_dataset(data, tokenizer, 512, responses="last", min_response_tokens=5)
    assert len(every) == 2 and len(last) == 1 and last.report.n_dropped_short_response == 1
    a, b = every[0], last[0]
    assert torch.equal(a.input_ids, b.input_ids)
    response = tokenizer.decode(b.input_ids[~b.prompt_mask].tolist())
    assert response.startswith("class Point") and "def add" not in response  # the first answer is prompt now
    assert int((~a.prompt_mask).sum()) > int((~b.prompt_mask).sum())
    bad_id = int(b.input_ids[~b.prompt_mask][0])
    dropped = load_dataset(data, tokenizer, 512, drop_token_ids=[bad_id])
    assert len(dropped) == 1 and dropped.report.n_dropped_token_ids == 1
    assert TOOL_CALL_TOKEN_IDS == (151657, 151658)
    assert drop_token_ids({"drop_tool_calls": True}) == TOOL_CALL_TOKEN_IDS


def test_presets_name_both_recipes():
    seven_b = DreamConfig()
    paper = resolve_settings(parse_args(["--preset", "dream-paper"]), seven_b)
    assert paper == resolve_settings(parse_args([]), seven_b)  # the default for large models
    assert (paper["loss"], paper["mask_eps"], paper["pad_as_response"], paper["responses"]) == (
        "sequence",
        1e-3,
        True,
        "last",
    )
    assert (paper["min_response_tokens"], paper["drop_tool_calls"], paper["max_samples"]) == (5, True, 300_000)
    assert (paper["clip"], paper["batch_size"], paper["grad_accum"], paper["t_min"], paper["t_max"]) == (
        7.0,
        1,
        8,
        0.2,
        0.8,
    )
    ours = resolve_settings(parse_args(["--preset", "dream-tokens"]), seven_b)
    assert (ours["loss"], ours["mask_eps"], ours["pad_as_response"], ours["responses"]) == ("tokens", 0.0, False, "all")
    same_optimisation = (
        "adapter",
        "rank",
        "alpha",
        "lr",
        "sm_lr",
        "clip",
        "batch_size",
        "grad_accum",
        "max_length",
        "sm_prob",
        "bf16",
        "gradient_checkpointing",
        "warmup_ratio",
        "sm_init_scale",
        "sm_init_centre",
    )
    assert {k: ours[k] for k in same_optimisation} == {k: paper[k] for k in same_optimisation}
    assert set(PRESETS) == {"tiny", "dream-paper", "dream-tokens"}


def test_dream_paper_run_keeps_the_best_checkpoint_and_caps_the_samples(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": f"Code {i}."}, {"role": "assistant", "content": code}]}
            )
            + "\n"
            for i, code in enumerate(CODE)
        )
    )
    summary = main(
        [
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--output-dir",
            str(tmp_path),
            "--name",
            "paper",
            "--preset",
            "dream-paper",
            "--full",
            "--no-gradient-checkpointing",
            "--max-steps",
            "3",
            "--grad-accum",
            "2",
            "--max-samples",
            "8",
            "--eval-every",
            "1",
            "--eval-batches",
            "1",
            "--max-length",
            "128",
            "--device",
            "cpu",
        ]
    )
    assert "on 8 sequences" in capsys.readouterr().out
    run = tmp_path / "paper"
    best = json.loads((run / "best" / "best.json").read_text())
    losses = [r["val_soft_mask"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert best == summary["best"] and best["val_loss"] == min(losses) and best["step"] == 1 + losses.index(min(losses))
    assert (run / "best" / "model.safetensors").exists() and (run / "final" / "model.safetensors").exists()
    assert (run / "best" / "transparency_config.json").exists()
