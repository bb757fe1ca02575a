"""The spelling task of the parallel-decoding experiment: lexicon, validity checker, splits, determinism, layout."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from softmask_ext.data.parallel_task import SPLITS, SpellingTask
from softmask_ext.model import DreamConfig

TASK = SpellingTask.generate(0)


def letters_of(task, words, choices):
    return [letter for w, c in zip(words, choices) for letter in task.spellings[w][c]]


def test_lexicon_spellings_are_distinct_and_differ_at_every_position():
    all_spellings = [s for word in TASK.spellings for s in word]
    assert len(set(all_spellings)) == len(all_spellings)
    assert [len(word) for word in TASK.spellings] == [(2, 3)[w % 2] for w in range(TASK.lexicon_size)]
    for word in TASK.spellings:
        for a, b in itertools.combinations(word, 2):
            assert all(x != y for x, y in zip(a, b))
        assert all(0 <= letter < TASK.alphabet_size for s in word for letter in s)


@given(st.data())
def test_every_choice_of_spellings_is_valid(data):
    words = data.draw(st.lists(st.integers(0, TASK.lexicon_size - 1), min_size=4, max_size=4))
    choices = [data.draw(st.integers(0, len(TASK.spellings[w]) - 1)) for w in words]
    answer = TASK.answer_tokens(TASK.sequence_ids(words, letters_of(TASK, words, choices)))
    assert TASK.is_valid(words, answer)
    assert TASK.word_validity(words, answer) == [True] * 4


@given(st.data())
def test_mixing_two_spellings_within_a_word_is_invalid(data):
    """The failure of parallel decoding: letters of one word taken from different spellings."""
    words = data.draw(st.lists(st.integers(0, TASK.lexicon_size - 1), min_size=4, max_size=4))
    i = data.draw(st.integers(0, 3))
    first, second = data.draw(st.permutations(range(len(TASK.spellings[words[i]]))))[:2]
    cut = data.draw(st.integers(1, TASK.word_length - 1))
    choices = [0] * 4
    answer = letters_of(TASK, words, choices)
    n = TASK.word_length
    answer[i * n : (i + 1) * n] = TASK.spellings[words[i]][first][:cut] + TASK.spellings[words[i]][second][cut:]
    tokens = TASK.answer_tokens(TASK.sequence_ids(words, answer))
    assert not TASK.is_valid(words, tokens)
    assert TASK.word_validity(words, tokens) == [j != i for j in range(4)]


def test_non_letter_tokens_and_other_words_spellings_are_invalid():
    words = [0, 1, 2, 3]
    answer = TASK.answer_tokens(TASK.sequence_ids(words, letters_of(TASK, words, [0] * 4)))
    masked = list(answer)
    masked[5] = TASK.token_ids["mask_token_id"]
    assert TASK.word_validity(words, masked) == [True, False, True, True]
    swapped = letters_of(TASK, [1, 0, 2, 3], [0] * 4)  # words 0 and 1 spelled with each other's letters
    assert TASK.word_validity(words, TASK.answer_ids(swapped)) == [False, False, True, True]


def test_checker_and_layout_errors_name_the_problem():
    with pytest.raises(ValueError, match="16 tokens"):
        TASK.is_valid([0, 1, 2, 3], [TASK.letter_token(0)] * 15)
    with pytest.raises(ValueError, match="word indices"):
        TASK.sequence_ids([0, 1, 2, TASK.lexicon_size])
    with pytest.raises(ValueError, match="21 tokens"):
        TASK.answer_tokens([0] * 20)
    with pytest.raises(ValueError, match="alphabet_size"):
        SpellingTask.generate(alphabet_size=2, spellings_per_word=(3,))
    with pytest.raises(ValueError, match="split"):
        TASK.sample("dev", 4)
    with pytest.raises(ValueError, match="distinct test prompts"):
        TASK.sample("test", 10_000)


def test_splits_are_disjoint_and_every_prompt_is_in_its_split():
    items = {split: TASK.sample(split, 300, seed=0) for split in SPLITS}
    prompts = {split: {item.words for item in found} for split, found in items.items()}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not prompts[a] & prompts[b]
    for split, found in items.items():
        assert all(SpellingTask.split_of(item.words) == split for item in found)
        assert all(TASK.is_valid(item.words, TASK.answer_ids(item.answer)) for item in found)
    assert len(prompts["validation"]) == len(prompts["test"]) == 300  # held-out prompts are distinct
    everything = list(itertools.product(range(TASK.lexicon_size), repeat=TASK.prompt_words))
    shares = {split: sum(SpellingTask.split_of(w) == split for w in everything) / len(everything) for split in SPLITS}
    assert shares["train"] == pytest.approx(0.8, abs=0.02)
    assert shares["validation"] == pytest.approx(0.1, abs=0.01) and shares["test"] == pytest.approx(0.1, abs=0.01)


def test_generation_is_deterministic_and_seeded():
    assert SpellingTask.generate(0) == TASK
    assert SpellingTask.generate(1) != TASK
    assert TASK.sample("test", 50, seed=3) == TASK.sample("test", 50, seed=3)
    assert TASK.sample("test", 50, seed=3) != TASK.sample("test", 50, seed=4)
    first, second = TASK.examples(TASK.sample("train", 8)), TASK.examples(TASK.sample("train", 8))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, second))


def test_examples_and_canvas_layout():
    item = TASK.sample("train", 1, seed=5)[0]
    example = TASK.examples([item])[0]
    ids = example.input_ids.tolist()
    assert len(ids) == TASK.sequence_length == 21
    assert (~example.prompt_mask).nonzero().flatten().tolist() == TASK.answer_positions
    assert TASK.answer_tokens(ids) == TASK.answer_ids(item.answer)
    # each word token sits right before its letters
    assert [ids[p - 1] for p in TASK.answer_positions[:: TASK.word_length]] == [TASK.word_token(w) for w in item.words]
    canvas = TASK.sequence_ids(item.words)
    mask = TASK.token_ids["mask_token_id"]
    assert [t for t in canvas if t == mask] == [mask] * TASK.answer_length
    assert [p for p, t in enumerate(canvas) if t == mask] == TASK.answer_positions
    DreamConfig(
        vocab_size=TASK.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        **TASK.token_ids,
    )  # the ids fit a model's vocabulary
