#!/usr/bin/env bash
# Quick start, command 1: install, then train the two-phase demo on CPU (about 4 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--dry-run" ]; then  # say what would run: the install command, then train.py's plan (writes nothing)
    echo "bash scripts/install.sh"
    exec python train.py --config configs/demo/phase1.py configs/demo/phase2.py "$@"
fi
bash scripts/install.sh
exec python train.py --config configs/demo/phase1.py configs/demo/phase2.py "$@"
