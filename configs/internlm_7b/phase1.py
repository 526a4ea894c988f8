# Phase 1 of 2: 900B tokens at 2K context, peak lr 3e-4 decaying to 10% of it.
_base_ = "base.py"
DATA_ROOT = "/data/internlm/tokenized"  # replace with your tokenized shard folders (docs/data.md)

data = dict(
    total_tokens=900_000_000_000,
    train_folder={
        f"{DATA_ROOT}/web": 0.76,
        f"{DATA_ROOT}/encyclopedia": 0.048,
        f"{DATA_ROOT}/books": 0.044,
        f"{DATA_ROOT}/papers": 0.032,
        f"{DATA_ROOT}/code": 0.07,
        f"{DATA_ROOT}/other": 0.046,
    },
)
adam = dict(lr=3e-4, weight_decay=0.1)
lr_scheduler = dict(warmup_ratio=0.025, eta_min=3e-5)
phase = dict(name="phase1")
