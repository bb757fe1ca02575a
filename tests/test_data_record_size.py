"""Memory per record is bounded: huge records are dropped before tokenising, long texts are tokenised in pieces
(and the pieces tokenise exactly as the whole text)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import softmask_ext.data.datasets as datasets
from softmask_ext.data import load_dataset
from softmask_ext.data.stdlib_corpus import stdlib_texts
from softmask_ext.finetune import SHIPPED_MODEL
from softmask_ext.model import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]

# Peak memory of loading a 24 MB chat record and a 4 MB text document with the shipped tokenizer. Tokenised whole,
# about 200 bytes per character (the text alone: 820 MB); the record dropped unread and the text in pieces: 140 MB.
MEASURE = r"""
import json, resource, sys
from softmask_ext.data import load_dataset
from softmask_ext.model import load_tokenizer
tokenizer = load_tokenizer(sys.argv[1])
chat, text = sys.argv[2], sys.argv[3]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dropped = load_dataset([chat], tokenizer, max_length=128).report.n_dropped_too_long
blocks = len(load_dataset([text], tokenizer, max_length=128))
print(json.dumps({"dropped": dropped, "blocks": blocks,
                  "peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "tokenizer.json").exists(), reason="no shipped tokenizer")


def test_huge_records_take_bounded_memory(tmp_path):
    chat = tmp_path / "chat.jsonl"
    small = {"prompt": "Write add.", "response": "def add(a, b):\n    return a + b\n"}
    chat.write_text(json.dumps({"prompt": "x" * (24 << 20), "response": "y"}) + "\n" + json.dumps(small) + "\n")
    text = tmp_path / "text.txt"
    line = "def f(x):\n    return x + 1\n"
    text.write_text(line * ((4 << 20) // len(line)))
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(SHIPPED_MODEL), str(chat), str(text)],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dropped"] == 1 and result["blocks"] > 1000
    assert result["peak_growth_mb"] < 500, result


def test_pieces_tokenise_as_the_whole_text(monkeypatch):
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    texts = list(stdlib_texts("validation", 120_000))
    whole = datasets._encode_many(tokenizer, texts)
    monkeypatch.setattr(datasets, "TEXT_PIECE_CHARS", 2000)
    monkeypatch.setattr(datasets, "ENCODE_BATCH_CHARS", 5000)
    pieced: dict[int, list[int]] = {}
    for index, ids in datasets._encode_texts(tokenizer, texts):
        pieced.setdefault(index, []).extend(ids)
    assert [pieced[i] for i in range(len(texts))] == whole
    assert max(len(p) for t in texts for p in datasets._text_pieces(t)) <= 2000
    assert list(datasets._text_pieces("")) == [""]
    assert "".join(datasets._text_pieces("ab" * 5000)) == "ab" * 5000  # no safe cut: cut anyway


def test_truncate_mode_keeps_a_huge_records_beginning(tmp_path):
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "Write it.", "response": "def f():\n    pass\n" * 200_000}) + "\n")
    data = load_dataset([path], tokenizer, max_length=64, overlong="truncate")
    assert len(data) == 1 and len(data[0]) == 64 and data.report.n_truncated == 1
