# Phase 2 of 2: 100B tokens at 4K context (same tokens per step: micro_num halves) with more code and
# books; fresh warm-up and cosine from 1e-4 to 1e-5. Optimizer state carries over.
# A 4,096-token micro-batch needs 24.7 GiB of activations for 32 layers: recomputing half of them (checkpoint=0.5)
# brings a GPU to 71.4 GiB of 80 (82.4 GiB without; python tools/plan.py --config configs/internlm_7b/phase2.py
# --devices 128).
_base_ = "base.py"
DATA_ROOT = "/data/internlm/tokenized"  # replace with your tokenized shard folders (docs/data.md)

data = dict(
    seq_len=4096,
    micro_bsz=1,
    micro_num=4,
    total_tokens=100_000_000_000,
    train_folder={
        f"{DATA_ROOT}/web": 0.68,
        f"{DATA_ROOT}/encyclopedia": 0.06,
        f"{DATA_ROOT}/books": 0.07,
        f"{DATA_ROOT}/papers": 0.04,
        f"{DATA_ROOT}/code": 0.1,
        f"{DATA_ROOT}/other": 0.05,
    },
)
model = dict(checkpoint=0.5)
adam = dict(lr=1e-4, weight_decay=0.1)
lr_scheduler = dict(warmup_ratio=0.025, eta_min=1e-5)
phase = dict(name="phase2")
