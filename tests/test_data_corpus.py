"""The standard-library corpus: what is in it, and a split that never moves."""

import ast
import hashlib

import pytest

from softmask_ext.data.stdlib_corpus import (
    heldout_functions,
    list_modules,
    read_source,
    split_modules,
    split_of,
    stdlib_texts,
)


@pytest.fixture(scope="module")
def modules():
    return list_modules()


def test_split_follows_the_documented_hash_rule(modules):
    for module in modules:
        rank = int.from_bytes(hashlib.sha256(module.name.encode()).digest()[:8], "big")
        assert module.split == ("validation" if rank % 10_000 < 500 else "train")


def test_split_is_pinned():
    # A change here silently moves modules between training and validation: it must never happen.
    assert [split_of(name) for name in ("random", "shutil", "abc", "json.scanner")] == ["validation"] * 4
    assert [split_of(name) for name in ("os", "json", "typing", "asyncio.tasks")] == ["train"] * 4


def test_corpus_excludes_tests_apps_and_generated_files(modules):
    names = [m.name for m in modules]
    assert names == sorted(names) and len(set(names)) == len(names)
    banned = ("test.", "idlelib", "turtledemo", "encodings", "pydoc_data", "site-packages", "_sysconfigdata_")
    assert not [n for n in names if n.startswith(banned) or ".test." in n or ".tests." in n or n.endswith(".test")]
    assert {"os", "json", "collections", "asyncio.tasks"} <= set(names)
    share = sum(m.split == "validation" for m in modules) / len(modules)
    assert 0.02 < share < 0.10


def test_listing_rules_on_a_made_up_library(tmp_path):
    for relative in (
        "a.py",
        "pkg/__init__.py",
        "pkg/mod.py",
        "pkg/tests/test_mod.py",
        "test/test_a.py",
        "site-packages/dep.py",
        "idlelib/run.py",
        "config-3.11-x86_64/makesetup.py",
        "_sysconfigdata__linux.py",
        "notes.txt",
    ):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n")
    assert [m.name for m in list_modules(tmp_path)] == ["a", "pkg", "pkg.mod"]


def test_missing_or_empty_root_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        list_modules(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no Python source"):
        list_modules(tmp_path)


def test_splits_partition_the_corpus(modules):
    train = {m.name for m in split_modules("train")}
    validation = {m.name for m in split_modules("validation")}
    assert not train & validation
    assert train | validation == {m.name for m in modules}
    with pytest.raises(ValueError, match="split"):
        split_modules("test")


def test_size_cap_keeps_whole_modules_spread_over_the_library():
    full = split_modules("train")
    capped = split_modules("train", max_chars=400_000)
    assert {m.name for m in capped} < {m.name for m in full}
    assert sum(m.path.stat().st_size for m in capped) <= 400_000
    assert len({m.name[0] for m in capped}) > 3  # not the alphabetical head
    assert [m.name for m in capped] == [m.name for m in split_modules("train", max_chars=400_000)]
    with pytest.raises(ValueError, match="max_chars"):
        split_modules("train", max_chars=0)


def test_texts_are_the_files_contents():
    modules = split_modules("validation")
    texts = stdlib_texts("validation")
    assert len(texts) == len(modules)
    assert texts[0] == modules[0].path.read_text(encoding="utf-8")


def test_source_decoding_honours_the_coding_cookie(tmp_path):
    path = tmp_path / "latin.py"
    path.write_bytes("# -*- coding: latin-1 -*-\nname = 'café'\n".encode("latin-1"))
    assert "café" in read_source(path)


def test_heldout_functions_are_exact_top_level_functions_of_validation_modules():
    functions = heldout_functions(min_lines=3, max_lines=60)
    assert len(functions) > 30
    validation = {m.name: m for m in split_modules("validation")}
    for function in functions:
        assert function.module in validation
        text = read_source(validation[function.module].path)
        assert text.startswith(function.prefix + function.source)
        (node,) = ast.parse(function.source).body
        assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function.name
        assert 3 <= len(function.source.splitlines()) <= 60
    assert any(f.source.startswith("@") for f in functions)  # decorators are part of the function


def test_heldout_functions_reject_bad_line_limits():
    with pytest.raises(ValueError, match="min_lines"):
        heldout_functions(min_lines=5, max_lines=2)
