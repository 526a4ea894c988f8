# Phase 3 (long context): 20B tokens at 32K context with more books and papers (the model, its rotary base
# included, is that of every phase: positions restart per document and have no learned table); peak lr 3e-5 ->
# 3e-6. Optimizer state carries over; the layout changes, so the phase-2 checkpoint is loaded resharded (weights
# do not depend on the context size).
# A 32,768-token sequence is split over 4 context ranks (ring attention, zigzag-balanced) inside tensor 2 + sequence
# parallel: a tensor x context block of 8 GPUs fills a node, data 16 across nodes at 128 GPUs (context_parallel.md).
# Global batch: 16 data ranks x micro_bsz 1 x micro_num 4 = 64 sequences x 32,768 tokens = 2.1M tokens per step.
# The planner's figures (python tools/plan.py --config configs/internlm_7b/phase3.py --devices 128 --device-type
# a100-80gb; its best with --recommend): 46.0 GiB per GPU (weights 6.8 + fp32 gradients 14.5 + optimizer 2.6 +
# activations of one micro-batch's 8,192 tokens per context rank 18.1 + transient 4.0, mostly ring attention's
# fp32 score blocks), step 7.73 s = 2,120 tokens/GPU/s, 45.6% MFU; ring traffic 120.3 GB per GPU per step, inside
# the node.
_base_ = "base.py"
DATA_ROOT = "/data/internlm/tokenized"  # replace with your tokenized shard folders (docs/data.md)

parallel = dict(tensor=2, context=4, context_mode="ring", sequence_parallel=True)
data = dict(
    seq_len=32768,
    micro_bsz=1,
    micro_num=4,
    total_tokens=20_000_000_000,
    train_folder={
        f"{DATA_ROOT}/web": 0.5,
        f"{DATA_ROOT}/encyclopedia": 0.05,
        f"{DATA_ROOT}/books": 0.2,
        f"{DATA_ROOT}/papers": 0.1,
        f"{DATA_ROOT}/code": 0.1,
        f"{DATA_ROOT}/other": 0.05,
    },
)
adam = dict(lr=3e-5, weight_decay=0.1)
lr_scheduler = dict(warmup_ratio=0.02, eta_min=3e-6)
phase = dict(name="phase3")
