"""Training data: local files -> tokenised examples with a prompt mask -> padded batches in a resumable order.

Files (by suffix): ``.jsonl`` (one JSON object per line; blank lines are skipped), ``.json`` (a JSON array of
objects), ``.parquet`` (one row per record), ``.txt`` (the whole file is one ``text`` record). Record forms:

* chat: ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the tokenizer's chat template;
* prompt/response: ``{"prompt": str, "response": str}`` (optional ``system``), rendered as one user turn and one
  assistant turn of the chat template (without a template: prompt tokens, response tokens, eos);
* text: ``{"text": str}`` or ``.txt`` files, packed into fixed-length blocks (documents joined by eos).

Every example carries ``prompt_mask`` (True where a token is never noised): in chat and prompt/response records all
tokens except the assistant responses (each response's content and its closing ``<|im_end|>\\n``; in a
multi-turn conversation every assistant turn is a response, or with ``responses="last"`` only the last message, as
the authors' Dream fine-tuning does); in packed text nothing. ``min_response_tokens`` drops examples with fewer
response tokens and ``drop_token_ids`` those holding any of the given ids (the authors drop Qwen2's tool-call tokens
:data:`TOOL_CALL_TOKEN_IDS`). Records longer than
``max_length`` are dropped (``overlong="drop"``, the default) or cut to their first ``max_length`` tokens
(``overlong="truncate"``; a record whose cut leaves no response token is still dropped); the counts are in the
dataset's :class:`LoadReport` and logged.

Memory per record is bounded: a chat or prompt/response record with more characters than ``max_length`` tokens can
cover (``max_length`` times the longest token of the vocabulary, in characters) is dropped before it is tokenised
(with ``overlong="truncate"``, only that many leading characters of each message are tokenised), and text is
tokenised in pieces of at most ``TEXT_PIECE_CHARS`` characters cut after a newline, ``ENCODE_BATCH_CHARS`` at a
time.

A malformed record raises :class:`DataFormatError` naming the file and the line (JSONL) or the 1-based record number
(JSON arrays, Parquet). No records at all, or none left after length filtering, is also an error.

Order: :class:`BatchStream` draws one ``torch.Generator`` permutation per epoch from ``(seed, epoch)``; its state is
``(seed, epoch, position)``, so a resumed run sees the same batches as one that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from softmask_ext.data.stdlib_corpus import stdlib_texts

logger = logging.getLogger(__name__)

RecordFormat = Literal["auto", "chat", "prompt_response", "text"]
Overlong = Literal["drop", "truncate"]
Responses = Literal["all", "last"]
SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
#: Qwen2's ``<tool_call>`` and ``</tool_call>`` ids, whose samples the authors' Dream fine-tuning drops.
TOOL_CALL_TOKEN_IDS = (151657, 151658)
TEXT_PIECE_CHARS = 1 << 18  # longest piece of text tokenised in one call
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=[^\W\d_])(?= [^\W\d_])")
ENCODE_BATCH_CHARS = 1 << 20  # characters tokenised at once (the tokenizer takes ~200 bytes per character)


class DataFormatError(ValueError):
    """A data file or record that cannot be used; the message names the file and line or record."""


class ChatTokenizer(Protocol):
    """What the loaders need from a tokenizer (``PreTrainedTokenizerFast`` and ours both qualify)."""

    eos_token_id: int | None
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> Any: ...

    def apply_chat_template(
        self, conversation: list[dict[str, str]], tokenize: bool = ..., add_generation_prompt: bool = ...
    ) -> Any: ...


@dataclass(frozen=True)
class Example:
    """One training sequence: ``input_ids`` int64 [L] and ``prompt_mask`` bool [L] (True: never noised)."""

    input_ids: torch.Tensor
    prompt_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.numel()


@dataclass
class LoadReport:
    """What loading did: records read, examples kept, and what length filtering dropped or cut."""

    n_records: int = 0
    n_examples: int = 0
    n_dropped_too_long: int = 0
    n_dropped_short_response: int = 0
    n_dropped_token_ids: int = 0
    n_truncated: int = 0
    n_tokens: int = 0
    n_tokens_dropped: int = 0  # packing: the tail after the last full block

    def summary(self) -> str:
        return (
            f"{self.n_records} records -> {self.n_examples} examples ({self.n_tokens} tokens); "
            f"dropped as too long: {self.n_dropped_too_long}, for a short response: "
            f"{self.n_dropped_short_response}, for dropped token ids: {self.n_dropped_token_ids}, "
            f"truncated: {self.n_truncated}, "
            f"tokens dropped: {self.n_tokens_dropped}"
        )


@dataclass
class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenised examples held in memory, with the report of how they were made."""

    examples: list[Example]
    report: LoadReport = field(default_factory=LoadReport)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


# ----------------------------------------------------------------------------------------------------------- reading


def _json_record(text: str, path: Path, where: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}, {where}: not valid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(record, dict):
        raise DataFormatError(f"{path}, {where}: expected a JSON object, got {type(record).__name__}")
    return record


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                yield f"{path}, line {line_no}", _json_record(line, path, f"line {line_no}")


def _json_array_records(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(records, list):
        raise DataFormatError(
            f"{path}: expected a JSON array of records (use .jsonl for one record per line), "
            f"got {type(records).__name__}"
        )
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}, record {number}: expected a JSON object, got {type(record).__name__}")
        yield f"{path}, record {number}", record


def _parquet_records(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataFormatError(f"{path}: cannot read Parquet file ({err})") from None
    for number, record in enumerate(table.to_pylist(), start=1):
        yield f"{path}, record {number}", record


def _txt_record(path: Path) -> Iterator[tuple[str, dict]]:
    yield str(path), {"text": path.read_text(encoding="utf-8")}


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield ``(location, record)`` for each record of one file; ``location`` is "FILE, line N" or "FILE, record N"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    readers = {
        ".jsonl": _jsonl_records,
        ".json": _json_array_records,
        ".parquet": _parquet_records,
        ".txt": _txt_record,
    }
    if suffix not in readers:
        raise DataFormatError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    try:
        yield from readers[suffix](path)
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def record_format(record: dict, location: str) -> RecordFormat:
    """The form of one record from its fields: chat, prompt_response or text."""
    if "messages" in record:
        return "chat"
    if "prompt" in record or "response" in record:
        return "prompt_response"
    if "text" in record:
        return "text"
    raise DataFormatError(
        f"{location}: record has none of the fields 'messages', 'prompt'/'response', 'text' "
        f"(found: {', '.join(sorted(map(str, record))) or 'no fields'})"
    )


def _string_field(record: dict, key: str, location: str, allow_empty: bool = True) -> str:
    if key not in record:
        raise DataFormatError(f"{location}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataFormatError(f"{location}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataFormatError(f"{location}: field {key!r} is empty")
    return value


def chat_messages(record: dict, location: str, form: RecordFormat = "auto") -> list[dict[str, str]]:
    """The validated conversation of a chat or prompt/response record (``form`` "auto": from its fields)."""
    if form == "auto":
        form = record_format(record, location)
    if form != "chat":
        system = record.get("system")
        messages = [] if system is None else [{"role": "system", "content": _string_field(record, "system", location)}]
        messages.append({"role": "user", "content": _string_field(record, "prompt", location)})
        messages.append({"role": "assistant", "content": _string_field(record, "response", location, False)})
        return messages
    if "messages" not in record:
        raise DataFormatError(f"{location}: missing field 'messages'")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{location}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataFormatError(f"{location}: messages[{i}] must be an object, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataFormatError(f"{location}: messages[{i}].{key} must be a string")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise DataFormatError(f"{location}: conversation has no assistant message to train on")
    first_turn = 1 if roles[0] == "system" else 0
    if roles[first_turn] == "assistant":
        raise DataFormatError(f"{location}: conversation starts with an assistant message; a response needs a prompt")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ------------------------------------------------------------------------------------------------------ tokenising


def _encode_many(tokenizer: ChatTokenizer, texts: list[str]) -> list[list[int]]:
    # The Rust tokenizer behind a fast tokenizer encodes a list in parallel, and does not warn about documents longer
    # than the model (they are cut into blocks or filtered here).
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    return [list(tokenizer.encode(text, add_special_tokens=False)) for text in texts]


def _text_pieces(text: str) -> Iterator[str]:
    """``text`` in pieces of at most TEXT_PIECE_CHARS (one piece, possibly empty, for a short text).

    Each cut falls where byte-level BPE pre-tokenisers (GPT-2's, Qwen2's) always end a pre-token, so the pieces
    tokenise as the whole text would: after a newline with non-space characters on both sides, else before a space
    between two letters; only a window with neither is cut anywhere.
    """
    start = 0
    while len(text) - start > TEXT_PIECE_CHARS:
        end = start + TEXT_PIECE_CHARS
        cuts = [m.start() for m in _SAFE_CUT.finditer(text, start + 1, end)]
        newlines = [c for c in cuts if text[c - 1] == "\n"]
        cut = (newlines or cuts or [end])[-1]
        yield text[start:cut]
        start = cut
    yield text[start:]


def _encode_texts(tokenizer: ChatTokenizer, texts: Iterable[str]) -> Iterator[tuple[int, list[int]]]:
    """``(index of the text, token ids of one of its pieces)`` in order, encoding ENCODE_BATCH_CHARS at a time."""
    pieces: list[str] = []
    owners: list[int] = []
    size = 0
    for index, text in enumerate(texts):
        for piece in _text_pieces(text):
            pieces.append(piece)
            owners.append(index)
            size += len(piece)
            if size >= ENCODE_BATCH_CHARS:
                yield from zip(owners, _encode_many(tokenizer, pieces))
                pieces, owners, size = [], [], 0
    if pieces:
        yield from zip(owners, _encode_many(tokenizer, pieces))


def max_token_chars(tokenizer: ChatTokenizer) -> int | None:
    """Characters the longest vocabulary entry can stand for (its length as a string bounds them: a byte-level
    entry has one symbol per byte, a character-level one one per character); None when the vocabulary is unknown."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    vocab = get_vocab() if callable(get_vocab) else None
    return max(map(len, vocab), default=None) if vocab else None


def _eos_id(tokenizer: ChatTokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos token; it is needed to separate documents and pad batches")
    return int(eos)


def _render(tokenizer: ChatTokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_segments(
    tokenizer: ChatTokenizer, messages: list[dict[str, str]], responses: Responses = "all"
) -> list[tuple[str, bool]]:
    """Split a rendered conversation into ``(text, is_prompt)`` pieces; the non-prompt pieces are the responses:
    every assistant turn (``responses="all"``) or only the last message, which must be the assistant's (``"last"``).

    Each response is the text between the rendering of the preceding turns with the generation
    prompt and the rendering that includes the turn. This needs a prefix-consistent template (Qwen2's ChatML and
    ours are); anything else is reported instead of silently mis-masked.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or (responses == "last" and i != len(messages) - 1):
            continue
        head = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (head.startswith(done) and full.startswith(head)):
            raise ValueError(
                "the chat template does not render conversations prefix-consistently, so the assistant "
                "responses cannot be located; use a ChatML-style template"
            )
        segments += [(head[len(done) :], True), (full[len(head) :], False)]
        done = full
    rest = _render(tokenizer, messages, add_generation_prompt=False)
    if not rest.startswith(done):
        raise ValueError("the chat template does not render conversations prefix-consistently")
    segments.append((rest[len(done) :], True))
    return [(text, is_prompt) for text, is_prompt in segments if text]


def tokenize_conversation(
    tokenizer: ChatTokenizer, messages: list[dict[str, str]], responses: Responses = "all"
) -> Example:
    """Token ids and prompt mask of one conversation (each segment is tokenised on its own, so no token straddles
    a prompt/response boundary). Without a chat template: prompt turns and responses joined raw, then eos.
    ``responses``: every assistant turn is a response (``"all"``) or only the last message (``"last"``)."""
    if responses not in ("all", "last"):
        raise ValueError(f"responses must be 'all' or 'last', got {responses!r}")
    if responses == "last" and messages[-1]["role"] != "assistant":
        raise DataFormatError(
            f"the last message is the response (responses='last') but its role is "
            f"{messages[-1]['role']!r}, not 'assistant'"
        )
    last = len(messages) - 1
    if getattr(tokenizer, "chat_template", None):
        segments = chat_segments(tokenizer, messages, responses)
    else:
        segments = [
            (m["content"], m["role"] != "assistant" or (responses == "last" and i != last))
            for i, m in enumerate(messages)
        ]
    ids: list[int] = []
    mask: list[bool] = []
    for piece, (_, is_prompt) in zip(_encode_many(tokenizer, [text for text, _ in segments]), segments):
        ids += piece
        mask += [is_prompt] * len(piece)
    if not getattr(tokenizer, "chat_template", None):
        ids.append(_eos_id(tokenizer))
        mask.append(False)
    return Example(torch.tensor(ids, dtype=torch.int64), torch.tensor(mask, dtype=torch.bool))


def _fit_length(example: Example, max_length: int, overlong: Overlong, report: LoadReport) -> Example | None:
    if len(example) <= max_length:
        return example
    if overlong == "truncate":
        cut = Example(example.input_ids[:max_length], example.prompt_mask[:max_length])
        if not bool(cut.prompt_mask.all()):
            report.n_truncated += 1
            return cut
    report.n_dropped_too_long += 1
    return None


def _as_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    found = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not found:
        raise ValueError("no data files given")
    expanded = []
    for path in found:
        if path.is_dir():
            expanded += sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        else:
            expanded.append(path)
    if not expanded:
        raise DataFormatError(f"no data files ({', '.join(SUFFIXES)}) in {', '.join(map(str, found))}")
    return expanded


def _all_records(paths: list[Path]) -> list[tuple[str, dict]]:
    records = [item for path in paths for item in read_records(path)]
    if not records:
        raise DataFormatError(f"empty dataset: no records in {', '.join(map(str, paths))}")
    return records


def _check_lengths(max_length: int, overlong: str) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if overlong not in ("drop", "truncate"):
        raise ValueError(f"overlong must be 'drop' or 'truncate', got {overlong!r}")


def pack_texts(texts: Iterable[str], tokenizer: ChatTokenizer, block_length: int) -> TokenizedDataset:
    """Tokenise documents, join them with eos after each, and cut the stream into blocks of ``block_length``.

    The tail after the last full block is dropped (counted in ``report.n_tokens_dropped``). Blocks have an all-False
    ``prompt_mask``: every token may be noised.
    """
    _check_lengths(block_length, "drop")
    eos = torch.tensor([_eos_id(tokenizer)], dtype=torch.int64)
    report = LoadReport()
    parts: list[torch.Tensor] = []
    previous = None
    for index, ids in _encode_texts(tokenizer, texts):
        if previous is not None and index != previous:
            parts.append(eos)
        parts.append(torch.tensor(ids, dtype=torch.int64))
        previous = index
        report.n_records = index + 1
    if previous is not None:
        parts.append(eos)
    stream = torch.cat(parts) if parts else eos[:0]
    n_blocks = len(stream) // block_length
    if n_blocks == 0:
        raise DataFormatError(f"the text has {len(stream)} tokens, fewer than one block of {block_length}")
    blocks = stream[: n_blocks * block_length].view(n_blocks, block_length)
    no_prompt = torch.zeros(block_length, dtype=torch.bool)
    examples = [Example(block, no_prompt) for block in blocks]
    report.n_examples = n_blocks
    report.n_tokens = n_blocks * block_length
    report.n_tokens_dropped = len(stream) - report.n_tokens
    return TokenizedDataset(examples, report)


def load_dataset(
    paths: str | Path | Iterable[str | Path],
    tokenizer: ChatTokenizer,
    max_length: int,
    format: RecordFormat = "auto",
    overlong: Overlong = "drop",
    responses: Responses = "all",
    min_response_tokens: int = 1,
    drop_token_ids: Sequence[int] = (),
) -> TokenizedDataset:
    """Load training examples from local files (folders are searched for data files, in sorted order).

    ``format="auto"`` takes the form of each record from its fields; chat and prompt/response records may be mixed,
    text records may not be mixed with them (text is packed into blocks of ``max_length``, the others are one
    example per record). See the module docstring for the forms, masking and length rules, and for ``responses``,
    ``min_response_tokens`` and ``drop_token_ids`` (chat and prompt/response records).
    """
    if isinstance(min_response_tokens, bool) or not isinstance(min_response_tokens, int) or min_response_tokens < 1:
        raise ValueError(f"min_response_tokens must be an int >= 1, got {min_response_tokens!r}")
    _check_lengths(max_length, overlong)
    if format not in ("auto", "chat", "prompt_response", "text"):
        raise ValueError(f"format must be auto, chat, prompt_response or text, got {format!r}")
    records = _all_records(_as_paths(paths))
    forms = [record_format(record, where) if format == "auto" else format for where, record in records]
    packed = forms[0] == "text"
    mixed = next((i for i, form in enumerate(forms) if (form == "text") != packed), None)
    if mixed is not None:
        others = "text" if packed else f"{forms[0]}"
        raise DataFormatError(
            f"{records[mixed][0]}: a {forms[mixed]} record among {others} records; text is packed "
            "into blocks and cannot be mixed with chat or prompt/response records"
        )
    if packed:
        texts = [_string_field(record, "text", where) for where, record in records]
        dataset = pack_texts(texts, tokenizer, max_length)
    else:
        report = LoadReport(n_records=len(records))
        examples = []
        dropped = torch.tensor(sorted(set(drop_token_ids)), dtype=torch.int64)
        longest_token = max_token_chars(tokenizer)
        char_limit = None if longest_token is None else (max_length + 1) * longest_token
        for (where, record), form in zip(records, forms):
            messages = chat_messages(record, where, form)
            if char_limit is not None and sum(len(m["content"]) for m in messages) > char_limit:
                if overlong == "drop":  # cannot fit: dropped without spending memory on tokenising it
                    report.n_dropped_too_long += 1
                    continue
                messages = [{**m, "content": m["content"][:char_limit]} for m in messages]
            try:
                example = tokenize_conversation(tokenizer, messages, responses)
            except DataFormatError as err:
                raise DataFormatError(f"{where}: {err}") from None
            example = _fit_length(example, max_length, overlong, report)
            if example is None:
                continue
            if int((~example.prompt_mask).sum()) < min_response_tokens:
                report.n_dropped_short_response += 1
            elif dropped.numel() and bool(torch.isin(example.input_ids, dropped).any()):
                report.n_dropped_token_ids += 1
            else:
                examples.append(example)
        if report.n_dropped_too_long == len(records):
            raise DataFormatError(
                f"all {len(records)} records are longer than max_length={max_length} tokens; "
                "raise max_length or use overlong='truncate'"
            )
        if not examples:
            raise DataFormatError(f"none of the {len(records)} records is left after filtering: {report.summary()}")
        report.n_examples = len(examples)
        report.n_tokens = sum(len(e) for e in examples)
        dataset = TokenizedDataset(examples, report)
    logger.info("loaded %s", dataset.report.summary())
    if dataset.report.n_dropped_too_long or dataset.report.n_truncated:
        logger.warning(
            "length filtering to %d tokens: %d records dropped, %d truncated",
            max_length,
            dataset.report.n_dropped_too_long,
            dataset.report.n_truncated,
        )
    return dataset


def stdlib_dataset(
    tokenizer: ChatTokenizer,
    split: Literal["train", "validation"],
    block_length: int,
    max_chars: int | None = None,
) -> TokenizedDataset:
    """The standard-library corpus (:mod:`softmask_ext.data.stdlib_corpus`) packed into blocks."""
    return pack_texts(stdlib_texts(split, max_chars), tokenizer, block_length)


def split_off_validation(data: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): a ``fraction`` of the examples (at least one) drawn at random from ``seed`` is held out.
    The command-line tools call it for ``--val-fraction`` of ``--data``, which their messages name."""
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {fraction}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(fraction * len(data)))
    if n_val >= len(data):
        raise DataFormatError(f"{len(data)} examples are too few to hold out a validation set; pass --val-data")
    return [data[i] for i in order[n_val:]], [data[i] for i in order[:n_val]]


# -------------------------------------------------------------------------------------------------------- batching


def collate(
    examples: Sequence[Example],
    pad_token_id: int,
    pad_to: int | None = None,
    train_on_padding: bool = False,
) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch.

    Returns ``input_ids`` int64 [B, T], ``attention_mask`` bool [B, T] and ``prompt_mask`` bool [B, T], with T the
    longest example or ``pad_to``. Padding is ``pad_token_id`` with ``attention_mask`` False and ``prompt_mask`` True
    (never noised, no loss). ``train_on_padding=True`` instead makes padding part of the response, attended and
    noised, as Dream's SFT does so that the model learns to fill the rest of a generation with eos.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    longest = max(len(e) for e in examples)
    length = longest if pad_to is None else pad_to
    if length < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({longest} tokens)")
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.int64)
    attention_mask = torch.full((batch, length), train_on_padding, dtype=torch.bool)
    prompt_mask = torch.full((batch, length), not train_on_padding, dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = example.input_ids
        attention_mask[row, :n] = True
        prompt_mask[row, :n] = example.prompt_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_mask": prompt_mask}


#: Padding as response (the authors' Dream collator): each batch is padded to its longest example plus a random
#: ``0 .. RESPONSE_PADDING_EXTRA - 1`` tokens, rounded up to a multiple of ``RESPONSE_PADDING_MULTIPLE``.
RESPONSE_PADDING_EXTRA = 50
RESPONSE_PADDING_MULTIPLE = 8


def response_padding_length(longest: int, extra: int) -> int:
    """``longest + extra`` rounded up to a multiple of :data:`RESPONSE_PADDING_MULTIPLE`."""
    return -(-(longest + extra) // RESPONSE_PADDING_MULTIPLE) * RESPONSE_PADDING_MULTIPLE


def _seeded_generator(*key: object) -> torch.Generator:
    digest = hashlib.sha256(" ".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of ``n`` examples in one epoch: int64 [n], a function of ``(seed, epoch)`` only."""
    return torch.randperm(n, generator=_seeded_generator("softmask-ext data order", seed, epoch))


class BatchStream:
    """An endless, resumable stream of batches over a dataset, one fresh permutation per epoch.

    Each step takes the next ``batch_size`` examples of the epoch's permutation (the global batch across all
    ranks); rank ``r`` of ``world_size`` gets the r-th contiguous slice of it, so N ranks see exactly the examples
    one process would. The last partial global batch of an epoch is skipped (the next epoch reshuffles).
    ``state_dict()`` after a step is the position of the next batch; loading it continues the same sequence.

    ``pad_as_response=True`` pads each batch as the authors' Dream collator does (:func:`response_padding_length`,
    the extra drawn from ``(seed, epoch, position, rank)``) and trains on the padding (``collate``'s
    ``train_on_padding``): the model learns to end a response with pad (end-of-text) tokens.
    """

    def __init__(
        self,
        dataset: Sequence[Example],
        batch_size: int,
        pad_token_id: int,
        seed: int = 0,
        *,
        pad_to: int | None = None,
        train_on_padding: bool = False,
        pad_as_response: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if pad_as_response and pad_to is not None:
            raise ValueError("pad_as_response draws each batch's length; it cannot be combined with pad_to")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"the global batch_size {batch_size} must be divisible by world_size {world_size}")
        if len(dataset) < batch_size:
            raise ValueError(f"the dataset has {len(dataset)} examples, fewer than one batch of {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.pad_to = pad_to
        self.train_on_padding = train_on_padding
        self.pad_as_response = pad_as_response
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self._order: torch.Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data order state was saved with seed {state['seed']}, this stream uses {self.seed}")
        if not 0 <= state["position"] < self.batches_per_epoch:
            raise ValueError(
                f"data order position {state['position']} is outside an epoch of "
                f"{self.batches_per_epoch} batches (was the dataset or batch size changed?)"
            )
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._order is None:
            self._order = epoch_permutation(len(self.dataset), self.seed, self.epoch)
        start = self.position * self.batch_size
        shard = self.batch_size // self.world_size
        indices = self._order[start + self.rank * shard : start + (self.rank + 1) * shard].tolist()
        examples = [self.dataset[i] for i in indices]
        pad_to = self.pad_to
        if self.pad_as_response:
            draw = _seeded_generator("softmask-ext response padding", self.seed, self.epoch, self.position, self.rank)
            extra = int(torch.randint(RESPONSE_PADDING_EXTRA, (), generator=draw))
            pad_to = response_padding_length(max(map(len, examples)), extra)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return collate(examples, self.pad_token_id, pad_to, self.train_on_padding or self.pad_as_response)
