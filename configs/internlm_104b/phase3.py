# Phase 3 of 3: 0.2T tokens annealing on the highest-quality data; peak lr 4e-5 -> 4e-6.
# Together the three phases give 1.6T tokens with an overall mixture close to the report's.
_base_ = "base.py"
DATA_ROOT = "/data/internlm/tokenized"  # replace with your tokenized shard folders (docs/data.md)

data = dict(
    total_tokens=200_000_000_000,
    train_folder={
        f"{DATA_ROOT}/web": 0.64,
        f"{DATA_ROOT}/encyclopedia": 0.08,
        f"{DATA_ROOT}/books": 0.07,
        f"{DATA_ROOT}/papers": 0.05,
        f"{DATA_ROOT}/code": 0.1,
        f"{DATA_ROOT}/other": 0.06,
    },
)
adam = dict(lr=4e-5, weight_decay=0.01)
lr_scheduler = dict(warmup_ratio=0.025, eta_min=4e-6)
phase = dict(name="phase3")
