# Demo phase 1: mostly documentation prose, 128-token sequences.
_base_ = "base.py"
DEMO_DATA = "data_cache/demo"

data = dict(
    seq_len=128,
    total_steps=300,
    train_folder={f"{DEMO_DATA}/docs": 0.8, f"{DEMO_DATA}/code": 0.2},
)
adam = dict(lr=3e-3)
lr_scheduler = dict(warmup_ratio=0.05, eta_min=3e-4)
phase = dict(name="phase1")
