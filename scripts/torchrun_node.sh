#!/usr/bin/env bash
# Launch train.py on one node of a multi-node job without a scheduler. Run on every node:
#
#   NNODES=4 MASTER_ADDR=10.0.0.1 scripts/torchrun_node.sh configs/internlm_7b/phase1.py
set -euo pipefail
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR}"
torchrun --nnodes "$NNODES" --nproc_per_node "${GPUS_PER_NODE:-8}" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
    train.py --config "$@"
