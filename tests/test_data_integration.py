"""The data layer as the training and evaluation code consume it: the real chat template, noise, a training step."""

import json
from pathlib import Path

import pytest
import torch

from softmask_ext.data import BatchStream, load_dataset, save_tokenizer, stdlib_texts, train_tokenizer
from softmask_ext.diffusion.noise import FINETUNE_NOISE, sample_noise, stream_generator
from softmask_ext.evaluation.elbo import estimate_elbo
from softmask_ext.finetune import load_data, parse_args, resolve_settings
from softmask_ext.model.config import DreamConfig
from softmask_ext.model.dream import DreamModel
from softmask_ext.model.tokenizer import load_tokenizer
from softmask_ext.training.adapters import AdapterConfig
from softmask_ext.training.trainer import TrainConfig, Trainer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


# Dream-v0-Instruct's template (Qwen2's ChatML with a default system turn), as its tokenizer_config.json ships it.
DREAM_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(stdlib_texts("train", max_chars=200_000), vocab_size=600), out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def sft_data(tokenizer):
    return load_dataset(EXAMPLES, tokenizer, max_length=256)


def expected_responses():
    """Each sample record's assistant text, as the chat template closes it."""
    texts = []
    for name in sorted(p.name for p in EXAMPLES.glob("*.jsonl")):
        for line in (EXAMPLES / name).read_text().splitlines():
            record = json.loads(line)
            turns = record.get("messages") or [{"role": "assistant", "content": record["response"]}]
            texts.append("".join(t["content"] + "<|im_end|>\n" for t in turns if t["role"] == "assistant"))
    return texts


def test_noise_touches_exactly_the_assistant_responses(tokenizer, sft_data):
    responses = expected_responses()
    assert [tokenizer.decode(e.input_ids[~e.prompt_mask].tolist()) for e in sft_data] == responses

    stream = BatchStream(sft_data, batch_size=4, pad_token_id=tokenizer.pad_token_id, seed=3)
    for index in range(2 * stream.batches_per_epoch):
        batch = next(stream)
        response = ~batch["prompt_mask"]
        assert not (response & ~batch["attention_mask"]).any()  # padding is never a response token
        for draw in range(4):
            noised = sample_noise(
                batch["input_ids"], response, tokenizer.mask_token_id, FINETUNE_NOISE, stream_generator(0, index, draw)
            )
            assert not (noised.masked & ~response).any()
            assert noised.masked.any(dim=1).all()
            assert torch.equal(noised.x_t == tokenizer.mask_token_id, noised.masked)
            kept = noised.x_t[~noised.masked]
            assert torch.equal(kept, batch["input_ids"][~noised.masked])


def test_dream_template_gives_the_same_examples(tokenizer, tokenizer_dir, sft_data):
    dream = load_tokenizer(tokenizer_dir)
    dream.chat_template = DREAM_CHAT_TEMPLATE
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert dream.apply_chat_template(conversation, tokenize=False) == tokenizer.apply_chat_template(
        conversation, tokenize=False
    )
    for ours, theirs in zip(sft_data, load_dataset(EXAMPLES, dream, max_length=256)):
        assert torch.equal(ours.input_ids, theirs.input_ids) and torch.equal(ours.prompt_mask, theirs.prompt_mask)


def tiny_config(tokenizer):
    return DreamConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def tiny_model(tokenizer):
    return DreamModel(tiny_config(tokenizer))


def test_finetune_command_line_data_keeps_the_prompt_masks(tokenizer):
    args = parse_args(
        ["--data", str(EXAMPLES), "--val-data", str(EXAMPLES / "chat_sample.jsonl"), "--max-length", "256"]
    )
    train, val = load_data(args, tokenizer, resolve_settings(args, tiny_config(tokenizer)))
    assert [tokenizer.decode(e.input_ids[~e.prompt_mask].tolist()) for e in train] == expected_responses()
    assert [tokenizer.decode(e.input_ids[~e.prompt_mask].tolist()) for e in val] == expected_responses()[: len(val)]


def test_elbo_counts_only_response_tokens(tokenizer, sft_data):
    stream = BatchStream(sft_data, batch_size=4, pad_token_id=tokenizer.pad_token_id)
    batches = [next(stream) for _ in range(stream.batches_per_epoch)]
    result = estimate_elbo(tiny_model(tokenizer), batches, tokenizer.mask_token_id, num_samples=2, progress=False)
    assert result.num_tokens == sum(int((~b["prompt_mask"]).sum()) for b in batches)
    assert result.nll_bound > 0


def test_soft_mask_finetuning_steps_on_chat_data(tokenizer, sft_data, tmp_path):
    config = TrainConfig(
        run_dir=str(tmp_path / "run"),
        max_steps=2,
        batch_size=2,
        sm_prob=1.0,
        lr=1e-3,
        adapter=AdapterConfig(kind="full"),
        eval_batches=2,
    )
    summary = Trainer(
        tiny_model(tokenizer), sft_data, config, val_data=sft_data, tokenizer=tokenizer, device="cpu"
    ).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert summary["val_binary"] > 0 and summary["val_soft_mask"] > 0
