"""A synthetic task on which decoding several tokens per step visibly costs accuracy: spelling words.

A fixed lexicon gives every word two or three spellings, each a string of ``word_length`` letters; the spellings of
one word differ at every position. A prompt is a sequence of words; a valid answer writes each word with any one of
its spellings, in order::

    [bos] w1 a b c d  w2 e f g h  ...      (each word token followed by its letters; the letters are the answer)

Why this task. The answer has several valid values, and the tokens of one word depend on each other jointly: once one
letter of a word is written, the others are determined, but before that every letter is an even choice between the
spellings. A decoder that fixes one token per step resolves each word as soon as it starts it; one that fixes several
tokens of the same word in the same step draws them independently and mixes spellings ("the average of two modes"),
which is invalid. That is exactly the failure the soft-masking paper attributes to parallel decoding, in a form a
small model learns in minutes on a CPU: the lexicon is memorised, and prompts are random word sequences, so held-out
prompts are new sequences of known words.

Splits. Every prompt (word sequence) belongs to exactly one split, by a hash of its words: about 80% train, 10%
validation, 10% test. Train examples are drawn with replacement (a prompt may recur with other spellings); validation
and test prompts are distinct. Everything is a function of the seeds, so the data are the same on every machine.

Each word token sits right before its letters, so finding the word to spell is a fixed relative offset (easy with
rotary positions): what is hard is only the joint choice of a spelling. A decoder fills the letters as mask tokens
written in the prompt (infilling). Token ids: 0 pad/eos, 1 mask, 2 bos, then the words, then the letters.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .datasets import Example

__all__ = ["SPLITS", "SpellingTask", "TaskItem"]

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
# Shares of the prompt space, in tenths: buckets 0-7 train, 8 validation, 9 test.
_SPLIT_OF_BUCKET: tuple[Split, ...] = ("train",) * 8 + ("validation", "test")
_PAD, _MASK, _BOS = 0, 1, 2
_SPECIALS = 3


@dataclass(frozen=True)
class TaskItem:
    """One example: the prompt's words and one valid answer (letters, ``word_length`` per word)."""

    words: tuple[int, ...]
    answer: tuple[int, ...]


@dataclass(frozen=True)
class SpellingTask:
    """The lexicon and the layout of the spelling task.

    Attributes:
        spellings: ``spellings[w]`` are the spellings of word ``w``, each a tuple of letter indices.
        alphabet_size: letters are ``0 .. alphabet_size - 1``.
        prompt_words: words per prompt (the answer has ``prompt_words * word_length`` letters).
    """

    spellings: tuple[tuple[tuple[int, ...], ...], ...]
    alphabet_size: int
    prompt_words: int

    @classmethod
    def generate(
        cls,
        seed: int = 0,
        *,
        lexicon_size: int = 16,
        alphabet_size: int = 8,
        word_length: int = 4,
        spellings_per_word: Sequence[int] = (2, 3),
        prompt_words: int = 4,
    ) -> SpellingTask:
        """A lexicon drawn with ``seed``: word ``w`` gets ``spellings_per_word[w % len(spellings_per_word)]``
        spellings, distinct across the lexicon and differing at every position within a word."""
        counts = tuple(spellings_per_word)
        checks = {
            "lexicon_size >= 1": lexicon_size >= 1,
            "word_length >= 1": word_length >= 1,
            "prompt_words >= 1": prompt_words >= 1,
            "spellings_per_word: non-empty, each >= 1": bool(counts) and min(counts) >= 1,
            "alphabet_size >= the largest number of spellings": bool(counts) and alphabet_size >= max(counts),
            "alphabet_size ** word_length >= total spellings": alphabet_size**word_length
            >= sum(counts[w % len(counts)] for w in range(lexicon_size)),
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"SpellingTask.generate: need {', '.join(failed)}")
        rng = random.Random(f"spelling lexicon {seed}")
        used: set[tuple[int, ...]] = set()
        lexicon = []
        for w in range(lexicon_size):
            while True:
                # Each position draws distinct letters for the word's spellings: they differ everywhere.
                columns = [rng.sample(range(alphabet_size), counts[w % len(counts)]) for _ in range(word_length)]
                word = tuple(tuple(column[i] for column in columns) for i in range(len(columns[0])))
                if used.isdisjoint(word):
                    used.update(word)
                    lexicon.append(word)
                    break
        return cls(spellings=tuple(lexicon), alphabet_size=alphabet_size, prompt_words=prompt_words)

    def __post_init__(self) -> None:
        lengths = {len(s) for word in self.spellings for s in word}
        if not self.spellings or len(lengths) != 1 or self.prompt_words < 1:
            raise ValueError("SpellingTask needs a non-empty lexicon of equally long spellings and prompt_words >= 1")

    # ------------------------------------------------------------------------------------------------ layout
    @property
    def lexicon_size(self) -> int:
        return len(self.spellings)

    @property
    def word_length(self) -> int:
        return len(self.spellings[0][0])

    @property
    def answer_length(self) -> int:
        return self.prompt_words * self.word_length

    @property
    def sequence_length(self) -> int:
        """bos, then each word followed by its letters."""
        return 1 + self.prompt_words * (1 + self.word_length)

    @property
    def answer_positions(self) -> list[int]:
        """Where the letters sit in a sequence, in order."""
        n = self.word_length
        return [1 + i * (1 + n) + 1 + j for i in range(self.prompt_words) for j in range(n)]

    @property
    def vocab_size(self) -> int:
        return _SPECIALS + self.lexicon_size + self.alphabet_size

    @property
    def token_ids(self) -> dict[str, int]:
        """The special tokens, named as DreamConfig names them."""
        return {"pad_token_id": _PAD, "eos_token_id": _PAD, "mask_token_id": _MASK, "bos_token_id": _BOS}

    def word_token(self, word: int) -> int:
        return _SPECIALS + word

    def letter_token(self, letter: int) -> int:
        return _SPECIALS + self.lexicon_size + letter

    def sequence_ids(self, words: Sequence[int], answer: Sequence[int] | None = None) -> list[int]:
        """Token ids of ``[bos, w1, letters of w1, w2, letters of w2, ...]``; without ``answer`` (letter indices) the
        letters are mask tokens: the canvas a decoder fills."""
        self._check_words(words)
        n = self.word_length
        if answer is not None and len(answer) != self.answer_length:
            raise ValueError(f"an answer has {self.answer_length} letters, got {len(answer)}")
        ids = [_BOS]
        for i, w in enumerate(words):
            letters = [_MASK] * n if answer is None else self.answer_ids(answer[i * n : (i + 1) * n])
            ids += [self.word_token(w), *letters]
        return ids

    def answer_ids(self, answer: Sequence[int]) -> list[int]:
        """Token ids of an answer given as letter indices."""
        return [self.letter_token(a) for a in answer]

    def answer_tokens(self, sequence: Sequence[int]) -> list[int]:
        """The letter positions' token ids of a (decoded) sequence."""
        if len(sequence) != self.sequence_length:
            raise ValueError(f"a sequence has {self.sequence_length} tokens, got {len(sequence)}")
        return [sequence[p] for p in self.answer_positions]

    def _check_words(self, words: Sequence[int]) -> None:
        if len(words) != self.prompt_words or not all(0 <= w < self.lexicon_size for w in words):
            raise ValueError(
                f"a prompt is {self.prompt_words} word indices in [0, {self.lexicon_size}), got {list(words)}"
            )

    # ------------------------------------------------------------------------------------------------ checking
    def word_validity(self, words: Sequence[int], answer_tokens: Sequence[int]) -> list[bool]:
        """Per word of the prompt, whether its letters in ``answer_tokens`` (token ids, ``answer_length`` of them)
        are one of its spellings."""
        self._check_words(words)
        if len(answer_tokens) != self.answer_length:
            raise ValueError(f"an answer has {self.answer_length} tokens, got {len(answer_tokens)}")
        first = self.letter_token(0)
        letters = [t - first for t in answer_tokens]  # tokens that are not letters fall outside every spelling
        n = self.word_length
        return [tuple(letters[i * n : (i + 1) * n]) in self.spellings[w] for i, w in enumerate(words)]

    def is_valid(self, words: Sequence[int], answer_tokens: Sequence[int]) -> bool:
        """Whether ``answer_tokens`` spells every word of the prompt with one of its spellings."""
        return all(self.word_validity(words, answer_tokens))

    # ------------------------------------------------------------------------------------------------ data
    @staticmethod
    def split_of(words: Sequence[int]) -> Split:
        """The split a prompt belongs to (a hash of its words, the same on every machine)."""
        digest = hashlib.sha256(("spelling prompt " + " ".join(map(str, words))).encode()).digest()
        return _SPLIT_OF_BUCKET[digest[0] % len(_SPLIT_OF_BUCKET)]

    def sample(self, split: Split, n: int, seed: int = 0) -> list[TaskItem]:
        """``n`` items of ``split`` drawn with ``seed``: prompts uniformly from the split's prompts, each spelling
        uniformly. Validation and test prompts are distinct (at most the split's number of prompts)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        distinct = split != "train"
        most = self.lexicon_size**self.prompt_words // 20  # the split holds about a tenth of all prompts
        if distinct and n > most:
            raise ValueError(f"{n} distinct {split} prompts requested; at most {most} are drawn")
        rng = random.Random(f"spelling {split} {seed}")
        seen: set[tuple[int, ...]] = set()
        items = []
        while len(items) < n:
            words = tuple(rng.randrange(self.lexicon_size) for _ in range(self.prompt_words))
            if self.split_of(words) != split or (distinct and words in seen):
                continue
            seen.add(words)
            answer = tuple(letter for w in words for letter in rng.choice(self.spellings[w]))
            items.append(TaskItem(words, answer))
        return items

    def examples(self, items: Sequence[TaskItem]) -> list[Example]:
        """Training examples: the full sequences, everything but the letters marked as prompt (never noised)."""
        out = []
        for item in items:
            ids = torch.tensor(self.sequence_ids(item.words, item.answer), dtype=torch.long)
            prompt_mask = torch.ones(len(ids), dtype=torch.bool)
            prompt_mask[self.answer_positions] = False
            out.append(Example(ids, prompt_mask))
        return out
