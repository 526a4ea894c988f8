#!/usr/bin/env bash
# Install the framework into the current Python environment: torch first (kept when a torch >= 2.4 is already
# installed, e.g. your CUDA build on a GPU node), then this package in editable mode with the given extras.
#
#   bash scripts/install.sh            # the package
#   bash scripts/install.sh test       # plus what the tests need (pytest, ruff, matplotlib)
#
# Which torch build a fresh install gets follows your pip configuration: PyPI's default Linux wheel is the CUDA
# build (large); for a CPU-only machine point pip at PyTorch's CPU index, or preinstall the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1:-}
PIP=(python -m pip install --quiet --disable-pip-version-check)
if ! python -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 4))' 2>/dev/null; then
    "${PIP[@]}" torch==2.13.0
fi
if [[ -n "$EXTRAS" ]]; then
    "${PIP[@]}" -e ".[$EXTRAS]"
else
    "${PIP[@]}" -e .
fi
