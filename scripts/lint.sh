#!/usr/bin/env bash
# Lint and format checks of the tree: ruff (lint + format) for Python, clang-format for C++/CUDA.
#
#   bash scripts/lint.sh          # check only; exits non-zero on any finding (what CI runs)
#   bash scripts/lint.sh --fix    # rewrite the files in place: ruff format, ruff check --fix, clang-format -i
#
# Needs `ruff` and `clang-format` on PATH (`pip install ruff==0.17.6 clang-format==23.1.5`); configuration in
# pyproject.toml ([tool.ruff]) and .clang-format.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t cxx < <(git ls-files '*.h' '*.cpp' '*.cu' '*.cuh')

if [ "${1:-}" = "--fix" ]; then
    ruff format .
    ruff check --fix .
    ruff format .
    clang-format -i "${cxx[@]}"
    exit 0
fi

status=0
ruff check . || status=1
ruff format --check . || status=1
clang-format --dry-run --Werror "${cxx[@]}" || status=1
[ $status -eq 0 ] && echo "lint: clean"
exit $status
