"""The byte-level BPE tokenizer trained on the corpus: exact round trips, fixed special ids, loadable files."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from softmask_ext.data.stdlib_corpus import stdlib_texts
from softmask_ext.data.tokenizer_training import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    SpecialTokenIds,
    save_tokenizer,
    special_token_ids,
    train_stdlib_tokenizer,
    train_tokenizer,
)
from softmask_ext.model.tokenizer import load_tokenizer

CODE = 'def f(x):\n\tif x :\n        return  x . y  # café ✓\r\n\n\n    """doc"""   \n'


@pytest.fixture(scope="module")
def trained():
    return train_tokenizer(stdlib_texts("train", max_chars=200_000), vocab_size=600)


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    ids = save_tokenizer(trained, out, model_max_length=512)
    return out, ids


@pytest.fixture(scope="module")
def loaded(saved):
    return load_tokenizer(saved[0])


def test_vocabulary_has_the_requested_size_and_fixed_special_ids(trained):
    assert trained.get_vocab_size() == 600
    assert special_token_ids(trained) == SpecialTokenIds(eos=0, pad=0, mask=1, im_start=2, im_end=3, bos=4)


def test_special_ids_do_not_depend_on_the_corpus():
    other = train_tokenizer(["completely different text " * 50, "with other words\n" * 30], vocab_size=300)
    assert [other.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]


def test_heldout_code_round_trips_exactly(trained):
    for text in stdlib_texts("validation", max_chars=100_000) + [CODE]:
        assert trained.decode(trained.encode(text).ids, skip_special_tokens=False) == text


@given(st.text(max_size=200))
def test_any_text_round_trips(trained, text):
    assert trained.decode(trained.encode(text).ids, skip_special_tokens=False) == text


@given(st.text(max_size=200))
def test_any_text_round_trips_through_the_saved_files(loaded, text):
    assert loaded.decode(loaded.encode(text)) == text


def test_code_is_compressed(trained):
    text = "".join(stdlib_texts("validation", max_chars=100_000))
    assert len(trained.encode(text).ids) < len(text.encode("utf-8")) / 2


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["x"], vocab_size=200)


def test_saved_files_load_with_transformers_and_our_loader(saved):
    out, ids = saved
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["model_max_length"] == 512
    for tokenizer in (PreTrainedTokenizerFast.from_pretrained(out), load_tokenizer(out)):
        assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id, tokenizer.bos_token_id) == (
            ids.eos,
            ids.pad,
            ids.mask,
            ids.bos,
        )
        assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [ids.im_start, ids.im_end]
        assert tokenizer.model_max_length == 512
        encoded = tokenizer.encode(CODE)
        assert encoded == tokenizer.encode(CODE, add_special_tokens=False)  # no bos/eos added silently
        assert tokenizer.decode(encoded) == CODE
        assert tokenizer.decode(tokenizer.encode("x<|im_end|><|endoftext|>"), skip_special_tokens=True) == "x"


def test_stdlib_tokenizer_is_trained_and_saved_in_one_call(tmp_path):
    ids = train_stdlib_tokenizer(tmp_path, vocab_size=300, max_chars=50_000, model_max_length=128, show_progress=False)
    assert ids.mask == 1 and load_tokenizer(tmp_path).model_max_length == 128
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["special_token_ids"] == {"eos": 0, "pad": 0, "mask": 1, "im_start": 2, "im_end": 3, "bos": 4}


def test_chat_template_is_chatml_with_a_default_system_turn(loaded):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "def f(): pass"}]
    assert loaded.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\ndef f(): pass<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, chat[0]]
    assert loaded.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
