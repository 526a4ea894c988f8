#!/usr/bin/env bash
# Launch train.py on a Slurm allocation: one torchrun per node, 8 GPUs each.
#
#   sbatch --nodes 16 --gres gpu:8 --ntasks-per-node 1 --cpus-per-task 64 scripts/slurm_train.sh \
#       configs/internlm_7b/phase1.py configs/internlm_7b/phase2.py
#
# Rerunning the same sbatch line resumes from the newest checkpoint (the work_dir must be on shared storage).
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    train.py --config "$@"
