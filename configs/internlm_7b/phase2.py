# Phase 2 of 2: 100B tokens at 4K context (same tokens per step: micro_num halves) with more code and
# books; fresh warm-up and cosine from 1e-4 to 1e-5. Optimizer state carries over.
# A 4,096-token micro-batch needs 16.9 GiB of activations for 32 layers: 59.0 GiB per GPU of 80 without
# recomputation, so the planner's best stays the base layout with checkpoint=False (4.69 s per step, 3,497
# tokens/GPU/s, 50.0% MFU; python tools/plan.py --config configs/internlm_7b/phase2.py --devices 128 --device-type
# a100-80gb --recommend). Recomputing half the layers (checkpoint=0.5) would cost 43.2% MFU for memory not needed.
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
adam = dict(lr=1e-4, weight_decay=0.1)
lr_scheduler = dict(warmup_ratio=0.025, eta_min=1e-5)
phase = dict(name="phase2")
