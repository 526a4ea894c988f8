# Phase 4 (long context): 20B tokens at 32K context (the model of every phase, rotary base included); peak lr 2e-5
# -> 2e-6. Optimizer state carries over; the layout gains context parallelism (the phase-3 checkpoint
# is loaded resharded: weights do not depend on the context size).
# Layout at 2,048 GPUs: the base's tensor 4 + sequence parallel and pipeline 4 x 4 chunks, plus context 2 (ring):
# a tensor x context block of 8 GPUs fills a node; data 64. Every layer recomputed (checkpoint=True): without it
# the interleaved schedule holds 146 GiB of 16,384-token activations per GPU.
# Global batch: 64 data ranks x micro_bsz 1 x micro_num 4 = 256 sequences x 32,768 tokens = 8.4M tokens per step
# (the pipeline needs 4 micro-batches per data rank). The planner's figures (python tools/plan.py --config
# configs/internlm_104b/phase4.py --devices 2048 --device-type a100-80gb; its best with --recommend): 69.3 GiB per
# GPU on the most loaded stage (weights 12.6 + fp32 gradients 25.7 + optimizer 1.2 + activations 8.0 + transient
# 21.7, mostly ring attention's fp32 score blocks of 8,192-token chunks), step 35.03 s = 117 tokens/GPU/s, 29.6%
# MFU; ring traffic 98.7 GB per GPU per step. Pipeline 8 (data 32, micro_num 8) has more headroom: 53.4 GiB, 27.4%.
_base_ = "base.py"
DATA_ROOT = "/data/internlm/tokenized"  # replace with your tokenized shard folders (docs/data.md)

parallel = dict(context=2, context_mode="ring")
data = dict(
    seq_len=32768,
    micro_bsz=1,
    micro_num=4,
    total_tokens=20_000_000_000,
    train_folder={
        f"{DATA_ROOT}/web": 0.5,
        f"{DATA_ROOT}/encyclopedia": 0.06,
        f"{DATA_ROOT}/books": 0.2,
        f"{DATA_ROOT}/papers": 0.1,
        f"{DATA_ROOT}/code": 0.09,
        f"{DATA_ROOT}/other": 0.05,
    },
)
model = dict(checkpoint=True)
adam = dict(lr=2e-5, weight_decay=0.01)
lr_scheduler = dict(warmup_ratio=0.02, eta_min=2e-6)
phase = dict(name="phase4")
