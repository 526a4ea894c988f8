# Phase 1 of 3: the bulk of pretraining. 1.0T tokens, peak lr 2e-4 decaying to 10% of it.
# Mixture close to the report's overall mixture (web 75.1%, encyclopedia 4.9%, books 4.5%, papers 3.3%,
# code 7.6%, other 4.6%), a little more web early on.
_base_ = "base.py"
DATA_ROOT = "/data/internlm/tokenized"  # replace with your tokenized shard folders (docs/data.md)

data = dict(
    total_tokens=1_000_000_000_000,
    train_folder={
        f"{DATA_ROOT}/web": 0.78,
        f"{DATA_ROOT}/encyclopedia": 0.045,
        f"{DATA_ROOT}/books": 0.04,
        f"{DATA_ROOT}/papers": 0.03,
        f"{DATA_ROOT}/code": 0.065,
        f"{DATA_ROOT}/other": 0.04,
    },
)
adam = dict(lr=2e-4, weight_decay=0.1)
lr_scheduler = dict(warmup_ratio=0.025, eta_min=2e-5)
phase = dict(name="phase1")
