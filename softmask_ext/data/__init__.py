"""Data: the standard-library corpus, tokenizer training, and training-data loading and batching."""
from softmask_ext.data.datasets import (
    BatchStream,
    DataFormatError,
    Example,
    LoadReport,
    RESPONSE_PADDING_EXTRA,
    RESPONSE_PADDING_MULTIPLE,
    TOOL_CALL_TOKEN_IDS,
    TokenizedDataset,
    collate,
    epoch_permutation,
    load_dataset,
    pack_texts,
    read_records,
    response_padding_length,
    stdlib_dataset,
    tokenize_conversation,
)
from softmask_ext.data.stdlib_corpus import FunctionSource, heldout_functions, split_of, stdlib_texts
from softmask_ext.data.tokenizer_training import (
    SPECIAL_TOKENS,
    SpecialTokenIds,
    save_tokenizer,
    special_token_ids,
    train_stdlib_tokenizer,
    train_tokenizer,
)

__all__ = [
    "BatchStream", "DataFormatError", "Example", "FunctionSource", "LoadReport", "RESPONSE_PADDING_EXTRA",
    "RESPONSE_PADDING_MULTIPLE", "SPECIAL_TOKENS", "SpecialTokenIds", "TOOL_CALL_TOKEN_IDS",
    "TokenizedDataset", "collate", "epoch_permutation", "heldout_functions", "load_dataset", "pack_texts",
    "read_records", "response_padding_length", "save_tokenizer", "special_token_ids", "split_of", "stdlib_dataset", "stdlib_texts",
    "tokenize_conversation", "train_stdlib_tokenizer", "train_tokenizer",
]
