"""The README and docs/: the set-up commands as documented, result files that exist, links that resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = [ROOT / "benchmarks" / "results", ROOT / "experiments" / "results"]


def test_readme_has_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install torch==2.13.0 -e . && python -m softmask_ext.finetune" in readme
    assert 'pip install torch==2.13.0 -e ".[test]" && pytest' in readme


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_result_files_exist(page):
    """Every result file a page names (`name.json`, `.png`, `.log`, `.csv` in backticks, with or without the
    benchmarks/results/ or experiments/results/ prefix) is committed there."""
    text = page.read_text(encoding="utf-8")
    names = set(re.findall(r"`(?:(?:benchmarks|experiments)/results/)?([\w.-]+\.(?:json|png|log|csv))`", text))
    generic = {
        "transparency_config.json",
        "config.json",
        "metadata.json",
        "metrics.jsonl",
        "summary.json",
        "train_config.json",
        "adapter_config.json",
        "infill.png",
        "training.png",
        "kernel.json",
        "results.json",
        "manifest.json",
        "best.json",
    }
    missing = sorted(
        n for n in names - generic if not any((d / n).exists() for d in RESULTS) and not any(ROOT.rglob(n))
    )
    assert not missing, f"{page.name} names result files that are not committed: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_local_links_resolve(page):
    """Links to files of the repository resolve; pages under docs/ that another part of the project adds are
    allowed only when the docs index lists them."""
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path = (page.parent / target).resolve()
        if path.exists():
            continue
        if path.parent == ROOT / "docs" and path.suffix == ".md" and f"({path.name})" in index:
            continue
        broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"
