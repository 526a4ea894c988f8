#!/usr/bin/env bash
# Quick start, command 2 (and CI): install what the tests need, lint, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
python -m ruff check .
python -m ruff format --check .
python tools/docs_tables.py --check  # the docs' tables of figures are what the code gives (docs/parallel.md ...)
OMP_NUM_THREADS=1 python -m pytest -q -rs tests "$@"
