"""The Python standard library's own source code as a training corpus, with a fixed held-out split.

Every machine that runs this package has the corpus: the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``.
What is left out, and why:

* test suites (``test/``, ``tests/``) and third-party code (``site-packages/``);
* applications and demos rather than library code (``idlelib/``, ``turtledemo/``);
* generated files that are mostly data (``encodings/`` charmap tables, ``pydoc_data/`` topic strings,
  ``_sysconfigdata_*.py``, the build's ``config-*`` folder).

The split is per module and depends on nothing but the module's dotted name: a module is held out for validation
when ``sha256(name) mod 10_000 < 500`` (about 5 %). A module therefore keeps its side of the split when other
modules appear or disappear between Python versions, and two machines with the same Python agree exactly.
Modules are listed in dotted-name order; a size cap keeps whole modules in a fixed pseudo-random order (the same
hash), so a capped corpus is a spread-out sample rather than the alphabetical head of the library.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "validation"]

EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "site-packages",
        "dist-packages",
        "idlelib",
        "turtledemo",
        "encodings",
        "pydoc_data",
        "__pycache__",
        "lib-dynload",
    }
)
EXCLUDED_DIR_PREFIXES = ("config-",)
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata_",)

VALIDATION_PER_10K = 500


@dataclass(frozen=True)
class StdlibModule:
    """One source file of the standard library: dotted module name, file path and its side of the split."""

    name: str
    path: Path
    split: Split


@dataclass(frozen=True)
class FunctionSource:
    """A top-level function of a held-out module, decorators included, exactly as written in the file.

    ``prefix`` is the module's text before the function (its context for infilling); ``lineno`` is 1-based.
    """

    module: str
    name: str
    lineno: int
    source: str
    prefix: str


def stdlib_root() -> Path:
    """Folder of this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _hash_rank(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def split_of(module_name: str) -> Split:
    """The fixed split of a module, from its dotted name alone (see the module docstring)."""
    return "validation" if _hash_rank(module_name) % 10_000 < VALIDATION_PER_10K else "train"


def _module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_excluded(relative: Path) -> bool:
    folders = relative.parts[:-1]
    if any(part in EXCLUDED_DIRS or part.startswith(EXCLUDED_DIR_PREFIXES) for part in folders):
        return True
    return relative.name.startswith(EXCLUDED_FILE_PREFIXES)


def list_modules(root: str | Path | None = None) -> list[StdlibModule]:
    """All corpus modules under ``root`` (default: this interpreter's stdlib), sorted by dotted name."""
    base = Path(root) if root is not None else stdlib_root()
    if not base.is_dir():
        raise ValueError(f"standard library folder not found: {base}")
    modules = []
    for path in base.rglob("*.py"):
        relative = path.relative_to(base)
        if _is_excluded(relative) or not path.is_file():
            continue
        name = _module_name(relative)
        if name:
            modules.append(StdlibModule(name=name, path=path, split=split_of(name)))
    modules.sort(key=lambda m: m.name)
    if not modules:
        raise ValueError(f"no Python source files found under {base}")
    return modules


def read_source(path: str | Path) -> str:
    """A source file's text, decoded as Python itself would (PEP 263 coding cookie, else UTF-8)."""
    with tokenize.open(path) as handle:
        return handle.read()


def split_modules(split: Split, max_chars: int | None = None, root: str | Path | None = None) -> list[StdlibModule]:
    """The modules of one split, in dotted-name order.

    ``max_chars`` caps the total source size: whole modules are taken in the fixed hash order until the next one
    would exceed the cap (at least one module is always kept).
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    chosen = [m for m in list_modules(root) if m.split == split]
    if max_chars is None:
        return chosen
    kept, total = [], 0
    for module in sorted(chosen, key=lambda m: _hash_rank(m.name)):
        size = module.path.stat().st_size
        if kept and total + size > max_chars:
            continue
        kept.append(module)
        total += size
    return sorted(kept, key=lambda m: m.name)


def stdlib_texts(split: Split, max_chars: int | None = None, root: str | Path | None = None) -> list[str]:
    """Source texts of one split (one string per module, dotted-name order); see :func:`split_modules`."""
    return [read_source(m.path) for m in split_modules(split, max_chars, root)]


def heldout_functions(
    max_chars: int | None = None,
    root: str | Path | None = None,
    min_lines: int = 3,
    max_lines: int | None = 60,
) -> list[FunctionSource]:
    """Top-level functions (``def`` / ``async def``) of the validation modules, for infilling evaluation.

    Only held-out modules are read, so no function was seen in training. Functions shorter than ``min_lines`` or
    longer than ``max_lines`` (``None``: no limit) are skipped; modules that do not parse under this interpreter
    are skipped. Order: module name, then position in the file.
    """
    if min_lines < 1 or (max_lines is not None and max_lines < min_lines):
        raise ValueError(f"need 1 <= min_lines <= max_lines, got min_lines={min_lines}, max_lines={max_lines}")
    functions = []
    for module in split_modules("validation", max_chars, root):
        text = read_source(module.path)
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            n_lines = node.end_lineno - start + 1
            if n_lines < min_lines or (max_lines is not None and n_lines > max_lines):
                continue
            functions.append(
                FunctionSource(
                    module=module.name,
                    name=node.name,
                    lineno=start,
                    source="".join(lines[start - 1 : node.end_lineno]),
                    prefix="".join(lines[: start - 1]),
                )
            )
    return functions
