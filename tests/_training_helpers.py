"""Small models, examples and checkpoint folders for the training tests."""

from __future__ import annotations

from pathlib import Path

import torch

from softmask_ext.data import Example, save_tokenizer, train_tokenizer
from softmask_ext.model import DreamConfig, DreamModel
from softmask_ext.model.mdlm import MDLMConfig, MDLMModel

MASK_ID = 1
PAD_ID = 0

CODE = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "import os\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n",
] * 8


def tiny_config(vocab_size: int = 64, **overrides) -> DreamConfig:
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        mask_token_id=MASK_ID,
        pad_token_id=PAD_ID,
        eos_token_id=PAD_ID,
        bos_token_id=PAD_ID,
    )
    return DreamConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> DreamModel:
    torch.manual_seed(seed)
    return DreamModel(tiny_config(**overrides))


def random_examples(n: int, vocab_size: int = 64, min_len: int = 6, max_len: int = 16, seed: int = 0) -> list[Example]:
    """Examples of random length whose first few tokens are a prompt (never noised)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (), generator=g))
        ids = torch.randint(2, vocab_size, (length,), generator=g)
        prompt = int(torch.randint(0, length - 1, (), generator=g))
        out.append(Example(ids, torch.arange(length) < prompt))
    return out


def make_model_dir(path: Path, seed: int = 0) -> Path:
    """A complete checkpoint folder: a BPE tokenizer trained on a few lines of code and a random tiny model."""
    ids = save_tokenizer(train_tokenizer(CODE, vocab_size=300), path, model_max_length=256)
    torch.manual_seed(seed)
    config = tiny_config(
        vocab_size=300, mask_token_id=ids.mask, pad_token_id=ids.pad, eos_token_id=ids.eos, bos_token_id=ids.bos
    )
    DreamModel(config).save_pretrained(path)
    return path


TINY_MDLM = MDLMConfig(vocab_size=30, model_length=16, hidden_dim=32, cond_dim=8, n_blocks=2, n_heads=4, dropout=0.1)


def tiny_mdlm(seed: int = 0) -> MDLMModel:
    """A tiny DiT whose adaLN and output weights are random (MDLM starts them at zero, which hides the blocks)."""
    torch.manual_seed(seed)
    model = MDLMModel(TINY_MDLM)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "linear" in name:
                p.normal_(0, 0.05)
    return model


def text_blocks(n: int, seed: int = 0) -> list[Example]:
    """``n`` fixed-length blocks of random tokens for :func:`tiny_mdlm` (no mask token, no prompt)."""
    g = torch.Generator().manual_seed(seed)
    return [Example(torch.randint(0, 29, (16,), generator=g), torch.zeros(16, dtype=torch.bool)) for _ in range(n)]
