"""Train a byte-level BPE tokenizer for code and save it as a checkpoint-directory tokenizer.

The saved folder holds what a Dream / Qwen2 checkpoint holds: ``tokenizer.json`` (the ``tokenizers`` model),
``tokenizer_config.json`` (special tokens, ``model_max_length`` and a ChatML ``chat_template`` in Qwen2's style) and
``special_tokens_map.json``. It loads with ``transformers.PreTrainedTokenizerFast.from_pretrained`` and with
``softmask_ext.model.tokenizer.load_tokenizer``.

Design choices, for code:

* byte-level, no normaliser: any string (tabs, runs of spaces, ``\\r\\n``, non-ASCII) decodes back exactly;
* GPT-2's pre-tokenisation regex, which keeps runs of indentation together as their own pieces;
* the special tokens come first in the vocabulary, so their ids are fixed (0..4) whatever the corpus:
  ``<|endoftext|>`` (eos and pad, as in Dream), ``<|mask|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|beginoftext|>``
  (bos, as in Dream-Coder).

:func:`train_stdlib_tokenizer` trains on the train split of the standard-library corpus
(:mod:`softmask_ext.data.stdlib_corpus`); ``python -m softmask_ext.pretrain`` uses it for the shipped model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from softmask_ext.data.stdlib_corpus import stdlib_texts

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
BOS_TOKEN = "<|beginoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, MASK_TOKEN, IM_START_TOKEN, IM_END_TOKEN, BOS_TOKEN)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML as in Qwen2: a default system turn when the conversation has none; the generation prompt opens an
# assistant turn. Rendering is prefix-consistent (the text of messages[:i] is a prefix of that of messages[:i+1]),
# which the SFT loaders rely on to find where each assistant response starts and ends.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the special tokens of a tokenizer trained here (eos is also the pad token)."""

    eos: int
    pad: int
    mask: int
    im_start: int
    im_end: int
    bos: int


def special_token_ids(tokenizer: Tokenizer) -> SpecialTokenIds:
    """Look the special tokens up in a ``tokenizers.Tokenizer``; a missing one is a ValueError."""
    ids = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no special token {token!r}")
        ids[token] = token_id
    return SpecialTokenIds(
        eos=ids[EOS_TOKEN],
        pad=ids[EOS_TOKEN],
        mask=ids[MASK_TOKEN],
        im_start=ids[IM_START_TOKEN],
        im_end=ids[IM_END_TOKEN],
        bos=ids[BOS_TOKEN],
    )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; the vocabulary holds 256 bytes + 5 special tokens + merges."""
    smallest = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= smallest:
        raise ValueError(f"vocab_size must exceed {smallest} (bytes + special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _added_tokens_decoder(ids: SpecialTokenIds) -> dict[str, dict]:
    by_id = {
        ids.eos: EOS_TOKEN,
        ids.mask: MASK_TOKEN,
        ids.im_start: IM_START_TOKEN,
        ids.im_end: IM_END_TOKEN,
        ids.bos: BOS_TOKEN,
    }
    return {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token_id, content in sorted(by_id.items())
    }


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, model_max_length: int = 2048) -> SpecialTokenIds:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out_dir``."""
    if model_max_length < 1:
        raise ValueError(f"model_max_length must be positive, got {model_max_length}")
    ids = special_token_ids(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "mask_token": MASK_TOKEN,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": False,
        "add_eos_token": False,
        # Decoding must give code back byte for byte; the cleanup would turn " ." into ".".
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": _added_tokens_decoder(ids),
        "special_token_ids": asdict(ids),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return ids


def train_stdlib_tokenizer(
    out_dir: str | Path,
    vocab_size: int = 4096,
    max_chars: int | None = None,
    model_max_length: int = 2048,
    show_progress: bool = True,
) -> SpecialTokenIds:
    """Train on the train split of the standard-library corpus and save into ``out_dir``."""
    tokenizer = train_tokenizer(stdlib_texts("train", max_chars), vocab_size, show_progress=show_progress)
    return save_tokenizer(tokenizer, out_dir, model_max_length)
