"""Loading training files: every format, the prompt mask, length filtering, packing, errors, batching and order."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from softmask_ext.data.datasets import (
    BatchStream,
    DataFormatError,
    Example,
    collate,
    epoch_permutation,
    load_dataset,
    pack_texts,
    read_records,
    stdlib_dataset,
    tokenize_conversation,
)
from softmask_ext.data.stdlib_corpus import stdlib_texts
from softmask_ext.data.tokenizer_training import save_tokenizer, train_tokenizer
from softmask_ext.model.tokenizer import load_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"

CHAT = [
    {
        "messages": [
            {"role": "user", "content": "Add two numbers."},
            {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Code only."},
            {"role": "user", "content": "Square."},
            {"role": "assistant", "content": "lambda x: x * x"},
            {"role": "user", "content": "Cube?"},
            {"role": "assistant", "content": "lambda x: x ** 3"},
        ]
    },
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(stdlib_texts("train", max_chars=200_000), vocab_size=600), out)
    return load_tokenizer(out)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def responses_and_prompt(tokenizer, example):
    ids, mask = example.input_ids.tolist(), example.prompt_mask.tolist()
    response = tokenizer.decode([i for i, p in zip(ids, mask) if not p])
    prompt = tokenizer.decode([i for i, p in zip(ids, mask) if p])
    return response, prompt


# ------------------------------------------------------------------------------------------------ formats and masks


def test_chat_prompt_mask_covers_everything_but_the_responses(tokenizer, tmp_path):
    dataset = load_dataset(write_jsonl(tmp_path / "chat.jsonl", CHAT), tokenizer, max_length=512)
    assert len(dataset) == 2
    for record, example in zip(CHAT, dataset):
        messages = record["messages"]
        assert example.input_ids.dtype == torch.int64 and example.prompt_mask.dtype == torch.bool
        assert tokenizer.decode(example.input_ids.tolist()) == tokenizer.apply_chat_template(messages, tokenize=False)
        response, prompt = responses_and_prompt(tokenizer, example)
        assert response == "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")
        assert all(m["content"] in prompt for m in messages if m["role"] != "assistant")
        assert not example.prompt_mask[-1]  # the closing <|im_end|>\n of the last response


def test_prompt_response_equals_the_two_turn_chat(tokenizer, tmp_path):
    record = {"prompt": "Add two numbers.", "response": "def add(a, b):\n    return a + b\n"}
    as_chat = {
        "messages": [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    }
    from_columns, from_chat = load_dataset(write_jsonl(tmp_path / "d.jsonl", [record, as_chat]), tokenizer, 512)
    assert torch.equal(from_columns.input_ids, from_chat.input_ids)
    assert torch.equal(from_columns.prompt_mask, from_chat.prompt_mask)
    with_system = load_dataset(write_jsonl(tmp_path / "s.jsonl", [{**record, "system": "Be brief."}]), tokenizer, 512)
    assert "Be brief." in tokenizer.decode(with_system[0].input_ids.tolist())


def test_without_a_chat_template_prompt_and_response_are_joined_raw(tokenizer):
    class Plain:
        chat_template = None
        eos_token_id = tokenizer.eos_token_id

        def encode(self, text, add_special_tokens=False):
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    example = tokenize_conversation(
        Plain(), [{"role": "user", "content": "Q: 2+2?"}, {"role": "assistant", "content": " A: 4"}]
    )
    response, prompt = responses_and_prompt(tokenizer, example)
    assert (prompt, response) == ("Q: 2+2?", " A: 4<|endoftext|>")


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(
        tokenizer, "chat_template", "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="prefix-consistently"):
        load_dataset(write_jsonl(tmp_path / "d.jsonl", CHAT[:1]), tokenizer, 256)


def test_jsonl_json_and_parquet_give_the_same_examples(tokenizer, tmp_path):
    records = [{"prompt": f"Task {i}.", "response": f"x = {i}\n"} for i in range(4)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(records))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    loaded = [load_dataset(path, tokenizer, 256) for path in (jsonl, as_json, parquet)]
    for other in loaded[1:]:
        assert all(
            torch.equal(a.input_ids, b.input_ids) and torch.equal(a.prompt_mask, b.prompt_mask)
            for a, b in zip(loaded[0], other)
        )


def test_parquet_chat_records(tokenizer, tmp_path):
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(CHAT[:1]), path)
    assert len(load_dataset(path, tokenizer, 256)) == 1


def test_sample_files_load(tokenizer):
    chat = load_dataset(EXAMPLES / "chat_sample.jsonl", tokenizer, 1024)
    pairs = load_dataset(EXAMPLES / "prompt_response_sample.jsonl", tokenizer, 1024)
    assert len(chat) == chat.report.n_records >= 3 and len(pairs) == pairs.report.n_records >= 3
    both = load_dataset(EXAMPLES, tokenizer, 1024)  # a folder: its data files in sorted order
    assert len(both) == len(chat) + len(pairs)


def test_text_records_and_txt_files_are_packed(tokenizer, tmp_path):
    docs = ["def a():\n    return 1\n" * 3, "import os\n" * 5, "class C:\n    pass\n" * 4]
    write_jsonl(tmp_path / "texts.jsonl", [{"text": d} for d in docs])
    for i, doc in enumerate(docs):
        (tmp_path / "txt" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "txt" / f"{i}.txt").write_text(doc)
    from_jsonl = load_dataset(tmp_path / "texts.jsonl", tokenizer, 8)
    from_txt = load_dataset(tmp_path / "txt", tokenizer, 8)
    direct = pack_texts(docs, tokenizer, 8)
    for dataset in (from_jsonl, from_txt):
        assert torch.equal(torch.stack([e.input_ids for e in dataset]), torch.stack([e.input_ids for e in direct]))


def test_packing_joins_documents_with_eos_and_drops_the_tail(tokenizer):
    docs = ["first document\n", "second one\n", "third\n" * 7]
    stream = []
    for doc in docs:
        stream += tokenizer.encode(doc) + [tokenizer.eos_token_id]
    dataset = pack_texts(docs, tokenizer, 5)
    blocks = torch.stack([e.input_ids for e in dataset])
    assert blocks.shape == (len(stream) // 5, 5)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert dataset.report.n_tokens_dropped == len(stream) % 5
    assert not any(e.prompt_mask.any() for e in dataset)
    with pytest.raises(DataFormatError, match="fewer than one block"):
        pack_texts(["x"], tokenizer, 100)


def test_stdlib_dataset_blocks(tokenizer):
    dataset = stdlib_dataset(tokenizer, "validation", block_length=64, max_chars=30_000)
    assert len(dataset) > 10 and all(len(e) == 64 for e in dataset)


# ---------------------------------------------------------------------------------------------------- length limits


def test_overlong_records_are_dropped_and_counted(tokenizer, tmp_path):
    records = [{"prompt": "p", "response": "short"}, {"prompt": "p", "response": "long " * 200}]
    dataset = load_dataset(write_jsonl(tmp_path / "d.jsonl", records), tokenizer, max_length=64)
    assert len(dataset) == 1 and dataset.report.n_dropped_too_long == 1 and dataset.report.n_records == 2


def test_truncation_keeps_the_start_and_drops_prompt_only_cuts(tokenizer, tmp_path):
    records = [{"prompt": "p", "response": "long " * 200}, {"prompt": "very long prompt " * 100, "response": "r"}]
    dataset = load_dataset(write_jsonl(tmp_path / "d.jsonl", records), tokenizer, 64, overlong="truncate")
    assert len(dataset) == 1 and len(dataset[0]) == 64
    assert dataset.report.n_truncated == 1 and dataset.report.n_dropped_too_long == 1
    full = load_dataset(write_jsonl(tmp_path / "one.jsonl", records[:1]), tokenizer, 10_000)[0]
    assert torch.equal(dataset[0].input_ids, full.input_ids[:64])


def test_everything_too_long_is_an_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "long " * 200}])
    with pytest.raises(DataFormatError, match="all 1 records are longer than max_length=16"):
        load_dataset(path, tokenizer, 16)


# ------------------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "response": ', "not valid JSON"),
        ('["a", "b"]', "expected a JSON object, got list"),
        ('{"prompt": "p", "response": 3}', "field 'response' must be a string"),
        ('{"prompt": "p", "response": "  "}', "field 'response' is empty"),
        ('{"question": "p"}', "none of the fields"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "user"}]}', r"messages\[0\].content must be a string"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant message"),
        ('{"messages": [{"role": "assistant", "content": "a"}]}', "starts with an assistant message"),
        ('{"text": "a text among chat records"}', "text record among"),
    ],
)
def test_malformed_jsonl_line_names_file_and_line(tokenizer, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(CHAT[0])
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(DataFormatError, match=message) as error:
        load_dataset(path, tokenizer, 256)
    assert f"{path}, line 3" in str(error.value)


def test_malformed_json_array_and_parquet_records_are_numbered(tokenizer, tmp_path):
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps([CHAT[0], {"prompt": 1, "response": "r"}]))
    with pytest.raises(DataFormatError, match=f"{as_json}, record 2: field 'prompt' must be a string"):
        load_dataset(as_json, tokenizer, 256)
    as_json.write_text('[{"prompt": "p",\n "response": }]')
    with pytest.raises(DataFormatError, match=f"{as_json}, line 2: not valid JSON"):
        load_dataset(as_json, tokenizer, 256)
    as_json.write_text(json.dumps(CHAT[0]))
    with pytest.raises(DataFormatError, match="expected a JSON array"):
        load_dataset(as_json, tokenizer, 256)
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "response": "r"}, {"prompt": "p", "response": None}]), parquet)
    with pytest.raises(DataFormatError, match=f"{parquet}, record 2: field 'response' must be a string"):
        load_dataset(parquet, tokenizer, 256)
    parquet.write_bytes(b"not parquet")
    with pytest.raises(DataFormatError, match="cannot read Parquet"):
        load_dataset(parquet, tokenizer, 256)


def test_empty_and_missing_inputs_are_clear_errors(tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataFormatError, match="empty dataset"):
        load_dataset(empty, tokenizer, 256)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset(tmp_path / "missing.jsonl", tokenizer, 256)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataFormatError, match="unsupported file type '.csv'"):
        list(read_records(tmp_path / "data.csv"))
    binary = tmp_path / "latin1.jsonl"
    binary.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataFormatError, match=f"{binary}: not UTF-8"):
        load_dataset(binary, tokenizer, 256)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataFormatError, match="no data files"):
        load_dataset(tmp_path / "nothing", tokenizer, 256)
    with pytest.raises(ValueError, match="max_length"):
        load_dataset(empty, tokenizer, 0)
    with pytest.raises(ValueError, match="overlong"):
        load_dataset(empty, tokenizer, 8, overlong="cut")


def test_a_forced_format_checks_every_record(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", CHAT)
    with pytest.raises(DataFormatError, match=f"{path}, line 1: missing field 'text'"):
        load_dataset(path, tokenizer, 256, format="text")
    with pytest.raises(DataFormatError, match=f"{path}, line 1: missing field 'prompt'"):
        load_dataset(path, tokenizer, 256, format="prompt_response")
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(DataFormatError, match=f"{pairs}, line 1: missing field 'messages'"):
        load_dataset(pairs, tokenizer, 256, format="chat")
    with pytest.raises(ValueError, match="format must be"):
        load_dataset(pairs, tokenizer, 256, format="csv")


# ---------------------------------------------------------------------------------------------------------- batching


def example(ids, prompt):
    return Example(torch.tensor(ids, dtype=torch.int64), torch.tensor(prompt, dtype=torch.bool))


def test_collate_pads_on_the_right():
    batch = collate([example([5, 6, 7], [True, False, False]), example([8], [True])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[True] * 3, [True, False, False]]
    assert batch["prompt_mask"].tolist() == [[True, False, False], [True, True, True]]
    assert batch["input_ids"].dtype == torch.int64 and batch["attention_mask"].dtype == torch.bool
    dream_style = collate([example([8], [True])], pad_token_id=0, pad_to=3, train_on_padding=True)
    assert dream_style["attention_mask"].tolist() == [[True] * 3]
    assert dream_style["prompt_mask"].tolist() == [[True, False, False]]
    with pytest.raises(ValueError, match="shorter than the longest"):
        collate([example([1, 2], [True, False])], 0, pad_to=1)
    with pytest.raises(ValueError, match="empty batch"):
        collate([], 0)


@given(
    st.lists(st.lists(st.tuples(st.integers(1, 99), st.booleans()), min_size=1, max_size=12), min_size=1, max_size=6),
    st.integers(0, 4),
)
def test_collate_keeps_every_example_intact(rows, extra):
    examples = [example([i for i, _ in row], [p for _, p in row]) for row in rows]
    length = max(map(len, rows)) + extra
    batch = collate(examples, pad_token_id=0, pad_to=length)
    assert batch["input_ids"].shape == (len(rows), length)
    for r, row in enumerate(rows):
        n = len(row)
        assert batch["input_ids"][r, :n].tolist() == [i for i, _ in row]
        assert batch["prompt_mask"][r, :n].tolist() == [p for _, p in row]
        assert batch["attention_mask"][r].sum() == n and (batch["input_ids"][r, n:] == 0).all()


def numbered(n):
    return [example([i], [False]) for i in range(n)]


def first_ids(batch):
    return batch["input_ids"][:, 0].tolist()


def test_permutation_depends_on_seed_and_epoch_only():
    assert torch.equal(epoch_permutation(50, 3, 1), epoch_permutation(50, 3, 1))
    assert not torch.equal(epoch_permutation(50, 3, 1), epoch_permutation(50, 3, 2))
    assert not torch.equal(epoch_permutation(50, 3, 1), epoch_permutation(50, 4, 1))
    assert sorted(epoch_permutation(50, 3, 1).tolist()) == list(range(50))


def test_stream_covers_each_epoch_once_and_reshuffles():
    stream = BatchStream(numbered(12), batch_size=4, pad_token_id=0, seed=7)
    epochs = [[i for _ in range(3) for i in first_ids(next(stream))] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12)) and epochs[0] != epochs[1]
    assert stream.state_dict() == {"seed": 7, "epoch": 2, "position": 0}


def test_stream_skips_the_partial_last_batch():
    stream = BatchStream(numbered(10), batch_size=4, pad_token_id=0)
    assert stream.batches_per_epoch == 2
    seen = [i for _ in range(2) for i in first_ids(next(stream))]
    assert seen == epoch_permutation(10, 0, 0)[:8].tolist() and stream.epoch == 1


def test_resumed_stream_continues_exactly():
    data = numbered(30)
    reference = BatchStream(data, batch_size=4, pad_token_id=0, seed=11)
    expected = [first_ids(next(reference)) for _ in range(20)]
    interrupted = BatchStream(data, batch_size=4, pad_token_id=0, seed=11)
    got = [first_ids(next(interrupted)) for _ in range(9)]
    resumed = BatchStream(data, batch_size=4, pad_token_id=0, seed=11)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    got += [first_ids(next(resumed)) for _ in range(11)]
    assert got == expected


def test_ranks_split_the_global_batch():
    data = numbered(24)
    single = BatchStream(data, batch_size=6, pad_token_id=0, seed=2)
    ranks = [BatchStream(data, batch_size=6, pad_token_id=0, seed=2, rank=r, world_size=3) for r in range(3)]
    for _ in range(10):
        assert first_ids(next(single)) == [i for stream in ranks for i in first_ids(next(stream))]


def test_stream_rejects_bad_settings():
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchStream(numbered(3), batch_size=4, pad_token_id=0)
    with pytest.raises(ValueError, match="divisible"):
        BatchStream(numbered(8), batch_size=4, pad_token_id=0, world_size=3, rank=0)
    with pytest.raises(ValueError, match="rank"):
        BatchStream(numbered(8), batch_size=4, pad_token_id=0, world_size=2, rank=2)
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(numbered(8), batch_size=0, pad_token_id=0)
    stream = BatchStream(numbered(8), batch_size=4, pad_token_id=0, seed=1)
    with pytest.raises(ValueError, match="seed"):
        stream.load_state_dict({"seed": 2, "epoch": 0, "position": 0})
    with pytest.raises(ValueError, match="outside an epoch"):
        stream.load_state_dict({"seed": 1, "epoch": 0, "position": 5})
