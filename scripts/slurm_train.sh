#!/usr/bin/env bash
# Launch train.py on a Slurm allocation: one torchrun per node, 8 GPUs each.
#
#   sbatch --nodes 16 --gres gpu:8 --ntasks-per-node 1 --cpus-per-task 64 scripts/slurm_train.sh \
#       configs/internlm_7b/phase1.py configs/internlm_7b/phase2.py
#
#   scripts/slurm_train.sh --dry-run configs/internlm_7b/phase1.py    # print the commands, run nothing
#
# Rerunning the same sbatch line resumes from the newest checkpoint (the work_dir must be on shared storage).
# train.py exits 0 when finished, 2 on a bad input, 3 when stopped unhealthy (non-finite steps), 75 when stopped
# on SIGTERM or ckpt.stop_file_path after saving (resumable: requeue), 124 when hung (monitor.hang_timeout_s; the
# stacks are in work_dir/hang_rank<r>.txt), 130 on a second Ctrl-C (docs/troubleshooting.md). torchrun turns any
# non-zero worker status into 1, so rank 0 also writes its status to $INTERNLM_EXIT_STATUS_FILE (on storage shared
# by the nodes: the submit folder) and this script exits with that status.
#
# Fault tolerance (docs/troubleshooting.md, "Automatic restarts"): inside the allocation torchrun restarts the
# worker group up to MAX_RESTARTS times (default 2) when a worker dies; each restart resumes from the last complete
# checkpoint. When the run still ends resumable (75 stopped after a save, 124 hung, 1 or a signal: a crash or a
# lost node) and REQUEUE=1, the job is requeued (`scontrol requeue`; submit with `sbatch --requeue`) and the
# requeued job resumes the same way; 0, 2, 3 and 130 are final. Submit with, e.g.
#   REQUEUE=1 sbatch --requeue --nodes 16 ... scripts/slurm_train.sh CONFIG.py
# Outside an allocation (--dry-run on a login node) the node count defaults to 2 and the master to localhost.
set -euo pipefail
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
if [[ $# -eq 0 ]]; then
    echo "usage: $0 [--dry-run] CONFIG.py [CONFIG.py ...] [--set KEY=VALUE ...]" >&2
    exit 2
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_JOB_NUM_NODES:-2}
if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null 2>&1; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
else
    MASTER_ADDR=${MASTER_ADDR:-localhost}
fi
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-2}
REQUEUE=${REQUEUE:-0}
JOB_ID=${SLURM_JOB_ID:-dryrun}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

cmd=(srun --kill-on-bad-exit=1 torchrun
    --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --max-restarts "$MAX_RESTARTS"
    --rdzv_id "$JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"
    train.py --config "$@")
if [[ $DRY_RUN -eq 1 ]]; then
    echo "# $NNODES node(s) x $GPUS_PER_NODE GPU(s), OMP_NUM_THREADS=$OMP_NUM_THREADS, torchrun restarts" \
        "$MAX_RESTARTS, requeue $REQUEUE; the plan of the run:"
    echo "python train.py --config $* --dry-run --world-size $((NNODES * GPUS_PER_NODE))"
    echo "# the launch:"
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
export INTERNLM_EXIT_STATUS_FILE=${INTERNLM_EXIT_STATUS_FILE:-${SLURM_SUBMIT_DIR:-$PWD}/.exit_status.$JOB_ID}
rm -f "$INTERNLM_EXIT_STATUS_FILE"
status=0
"${cmd[@]}" || status=$?
if [[ -s "$INTERNLM_EXIT_STATUS_FILE" ]]; then
    status=$(cat "$INTERNLM_EXIT_STATUS_FILE")  # the trainer's own status (torchrun reports 1 for any failure)
    rm -f "$INTERNLM_EXIT_STATUS_FILE"
fi
case "$status" in
    0 | 2 | 3 | 130) ;;  # finished, or a stop that a requeue would only repeat
    *)
        if [[ "$REQUEUE" == 1 && -n "${SLURM_JOB_ID:-}" ]]; then
            echo "train.py ended with status $status (resumable): requeueing job $SLURM_JOB_ID" >&2
            scontrol requeue "$SLURM_JOB_ID"
        fi
        ;;
esac
exit "$status"
