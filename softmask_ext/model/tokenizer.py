"""Tokenizer of a checkpoint directory, with its chat template.

Dream's own tokenizer class (`DreamTokenizer`) lives in the checkpoint as remote code, which we never run. Its
vocabulary is Qwen2's byte-level BPE, so we load the files with transformers' built-in classes instead:
`tokenizer.json` through the generic fast tokenizer, or `vocab.json` + `merges.txt` through `Qwen2Tokenizer`.
Special tokens, added tokens and the `chat_template` come from `tokenizer_config.json` (or `chat_template.jinja`);
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` renders it with jinja2.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load the tokenizer stored in checkpoint directory `path` (local files only, no remote code).

    Returns a transformers fast tokenizer; `mask_token_id`, `eos_token_id`, `pad_token_id` are those the
    tokenizer config declares.
    """
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer  # heavy import, only when a tokenizer is needed

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    files = set(os.listdir(path))
    if "tokenizer.json" in files:
        cls = PreTrainedTokenizerFast
    elif {"vocab.json", "merges.txt"} <= files:
        cls = Qwen2Tokenizer
    else:
        raise FileNotFoundError(
            f"no tokenizer in {path!r}: expected tokenizer.json, or vocab.json and merges.txt "
            "(with tokenizer_config.json for special tokens and the chat template)"
        )
    with warnings.catch_warnings():
        # The config names Dream's remote-code class; loading its files with a built-in class is intended.
        warnings.filterwarnings("ignore", message=".*tokenizer class you load.*")
        return cls.from_pretrained(path, local_files_only=True, trust_remote_code=False)
