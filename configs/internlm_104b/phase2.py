# Phase 2 of 3: 0.4T tokens with more knowledge-dense data (books, papers, encyclopedia, code).
# Fresh warm-up and cosine from a lower peak (1e-4 -> 1e-5); optimizer state carries over.
_base_ = "base.py"
DATA_ROOT = "/data/internlm/tokenized"  # replace with your tokenized shard folders (docs/data.md)

data = dict(
    total_tokens=400_000_000_000,
    train_folder={
        f"{DATA_ROOT}/web": 0.71,
        f"{DATA_ROOT}/encyclopedia": 0.055,
        f"{DATA_ROOT}/books": 0.05,
        f"{DATA_ROOT}/papers": 0.04,
        f"{DATA_ROOT}/code": 0.09,
        f"{DATA_ROOT}/other": 0.055,
    },
)
adam = dict(lr=1e-4, weight_decay=0.05)
lr_scheduler = dict(warmup_ratio=0.025, eta_min=1e-5)
phase = dict(name="phase2")
