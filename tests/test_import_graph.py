"""Package boundaries (docs/architecture.md): every module imports, the module-level import graph of the package
has no cycle, the model layer does not import decoding or training at module level, and the benchmarks and
experiments use only public names of the package, import no CLI module and start."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import softmask_ext

PACKAGE_DIR = Path(softmask_ext.__file__).resolve().parent
ROOT = PACKAGE_DIR.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: module level, also inside top-level if/try blocks, but not
    under ``if TYPE_CHECKING:`` and not inside functions or classes."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return found


def _imported_modules(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports at module level (``from .x import y`` counts as importing
    ``x.y`` when that is a module, else ``x``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _top_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            continue
        base = package.split(".")
        base = base[: len(base) - node.level + 1] if node.level else []
        target = ".".join([*base, *([node.module] if node.module else [])])
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            out.add(sub if sub in MODULES else target)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imported_modules(name, path) for name, path in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, as a list of nodes, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_relative_imports():
    assert "softmask_ext.conventions" in GRAPH["softmask_ext.model.loading"]


def test_no_import_cycle():
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH) or [])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_walk_finds_every_module():
    walked = {m.name for m in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="softmask_ext.")}
    assert walked - {"softmask_ext._C"} == set(MODULES) - {"softmask_ext"}


def test_model_layer_does_not_import_decoding_or_training():
    # model.diffusion_generate (DiffusionGenerateMixin) imports decoding inside the method: the one intended exception.
    for name, imported in GRAPH.items():
        if name.startswith("softmask_ext.model"):
            bad = sorted(m for m in imported if m.startswith(("softmask_ext.decoding", "softmask_ext.training")))
            assert not bad, f"{name} imports {bad} at module level"


def _private_uses(tree: ast.Module) -> list[str]:
    """Names with a leading underscore taken from the package: imported (``from softmask_ext.x import _y``) or read
    as attributes (``obj._y``, dunders and the compiled extension module ``_C`` aside)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("softmask_ext"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            if any(part.startswith("_") for part in (node.module or "").split(".")):
                found.append(node.module)
        elif (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id == "self")
        ):
            found.append(f"{ast.unparse(node.value)}.{node.attr}")
    return found


# The checkout these tests run from (the package itself may be installed elsewhere, as in CI).
REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*(REPO / "benchmarks").glob("*.py"), *(REPO / "experiments").glob("*.py")])
assert SCRIPTS, f"no benchmark or experiment scripts under {REPO}"
# The modules behind ``python -m softmask_ext.<cli>``: benchmarks and experiments call the library, never a CLI.
CLI_MODULES = {"softmask_ext.finetune", "softmask_ext.generate", "softmask_ext.evaluate", "softmask_ext.pretrain"}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_benchmarks_and_experiments_use_public_names_only(path):
    assert not _private_uses(ast.parse(path.read_text(encoding="utf-8"))), path.name


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_benchmarks_and_experiments_import_no_cli(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not imported & CLI_MODULES, f"{path.name} imports {sorted(imported & CLI_MODULES)}"


@pytest.mark.parametrize(
    "path",
    [p for p in SCRIPTS if "__main__" in p.read_text(encoding="utf-8")],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_scripts_start(path):
    """Every benchmark and experiment script imports what it names and parses its arguments (``--help``)."""
    done = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_private_use_finder():
    tree = ast.parse("from softmask_ext.x import _y\nimport torch\nd._logits(1)\ntorch.Tensor.__add__\nself._t")
    assert _private_uses(tree) == ["softmask_ext.x._y", "d._logits"]
