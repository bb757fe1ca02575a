"""softmask_ext.conventions: one owner for each shared convention, and no copy of them elsewhere in the package."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from softmask_ext import SoftMask, conventions
from softmask_ext.conventions import RandomStream, default_device, pad_or_eos

PACKAGE = Path(conventions.__file__).resolve().parent
ROOT = PACKAGE.parent


def test_pad_or_eos():
    assert pad_or_eos(SimpleNamespace(pad_token_id=3, eos_token_id=7)) == 3
    assert pad_or_eos(SimpleNamespace(pad_token_id=0, eos_token_id=7)) == 0  # 0 is an id, not a missing one
    assert pad_or_eos(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    with pytest.raises(ValueError, match="neither a pad nor an eos"):
        pad_or_eos(SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_random_stream_ids_are_fixed():
    # Recorded runs and checkpoints depend on these values: renumbering them changes every run's noise.
    assert {s.name: int(s) for s in RandomStream} == {
        "NOISE": 1,
        "SM_COIN": 2,
        "VALIDATION": 3,
        "TORCH_RNG": 4,
        "ELBO": 0x454C424F,
    }


def test_default_device():
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_soft_mask_beside(tmp_path):
    assert SoftMask.beside(tmp_path) is None
    SoftMask(k=2, scale=0.3).save_transparency_config(tmp_path)
    found = SoftMask.beside(tmp_path)
    assert found is not None and found.k == 2 and abs(found.to_transparency_config()["transparency_scale"] - 0.3) < 1e-6


def _code_constants(path: Path) -> list[str]:
    """String constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]


OWNED = {
    "file names": lambda s: (
        s
        in {
            conventions.MODEL_WEIGHTS,
            conventions.MODEL_INDEX,
            conventions.ADAPTER_CONFIG,
            conventions.ADAPTER_WEIGHTS,
            conventions.SOFT_MASK_WEIGHTS,
        }
    ),
    "the shipped model's folder": lambda s: s == "tiny-coder",
}
COPIED_CODE = {
    "pad-or-eos": re.compile(r"pad_token_id if .*pad_token_id is not None else .*eos_token_id"),
    "dtype names": re.compile(r"\{\s*\"float32\":\s*torch\.float32"),
    "the default device": re.compile(r"\"cuda\" if torch\.cuda\.is_available\(\) else \"cpu\""),
}


@pytest.mark.parametrize(
    "path",
    sorted(p for p in [*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")] if p.name != "conventions.py"),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_copy_of_an_owned_convention(path):
    constants = _code_constants(path)
    for what, owned in OWNED.items():
        assert not [c for c in constants if owned(c)], f"{path.name} spells {what} itself: use softmask_ext.conventions"
    text = path.read_text(encoding="utf-8")
    for what, pattern in COPIED_CODE.items():
        assert not pattern.search(text), f"{path.name} writes {what} itself: use softmask_ext.conventions"
