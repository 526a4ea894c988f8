# InternLM-104B pretraining: shared settings of every phase (model, layout, optimizer).
# Phase files build on this one with `_base_ = "base.py"` and set what changes.
#
# Layout for 2,048 A100-80GB (256 nodes x 8): the planner's best at this global batch (python tools/plan.py
# --config configs/internlm_104b/phase1.py --devices 2048 --device-type a100-80gb --recommend): tensor 4 with
# sequence parallel (two tensor groups per node), pipeline 4 with 4 interleaved chunks (82 layers in 16 virtual
# stages of 5-6), data 128, ZeRO-1 over the whole data-parallel group, no activation checkpointing.
# Global batch: 128 data ranks x micro_bsz 1 x micro_num 16 = 2,048 sequences x 2,048 tokens = 4.2M tokens per step.
# The planner's figures (same command without --recommend): 62.3 GiB per GPU on the most loaded stage (weights
# 12.6 + fp32 gradients 25.5 + optimizer 0.6 + activations 23.5 + transient 0.1; fits below 92% of 80 GiB),
# step 9.32 s = 220 tokens/GPU/s, 44.7% MFU at its assumed 50% matmul efficiency. The previous layout (tp8+sp x
# pp4 x2 chunks x dp64, zero1 8, checkpoint=True) gives 26.6 GiB but 157 tokens/GPU/s, 31.9% MFU: recomputing
# every layer costs a third more compute, and tensor 8 sends 274 GB per GPU per step against 86 GB at tensor 4.
# zero1 sizes tie on step time (the data-parallel traffic hides under compute at every size); the ranking takes
# the one with the most memory headroom, and zero1 8 would need 74.2 GiB. checkpoint="attn" ranks next (219
# tokens/GPU/s, the same memory here: flash attention saves little); checkpoint=True (41.3 GiB) is the fallback if
# a GPU runs short of what the memory model does not count (CUDA context, NCCL buffers, fragmentation).
# On fewer GPUs the zero1 group (all of dp) shrinks and the states grow: 63.1 GiB at 1,024, 67.8 at 256, 74.2 at
# 128 (over 92% of 80 GiB: set model.checkpoint=True there, 53.2 GiB).
# Run `python train.py --config configs/internlm_104b/phase1.py ... --dry-run --world-size 2048` to see the plan.
JOB_NAME = "internlm_104b"
work_dir = "work_dirs/internlm_104b"
seed = 1024

SEQ_LEN = 2048


model = dict(
    preset="internlm-104b",  # hidden 10240, 82 layers, 80 heads of 128, vocab 65536
    dtype="torch.bfloat16",
    checkpoint=False,  # 62.3 GiB of 80 without recomputation in this layout (see above)
    num_chunks=4,
    use_flash_attn=True,
    max_position_embeddings=32768,  # the longest context of any phase (phase4.py); rotary has no learned table
)

parallel = dict(
    tensor=dict(size=4, mode="mtp"),
    pipeline=dict(size=4, interleaved_overlap=True),
    zero1=dict(size=-1, fsdp=False),  # the whole data-parallel group (128 at 2,048 GPUs)
    sequence_parallel=True,
)

data = dict(seq_len=SEQ_LEN, micro_bsz=1, micro_num=16, valid_every=1000, valid_micro_num=4, valid_ratio=0.001)

adam = dict(lr=2e-4, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.1)
lr_scheduler = dict(warmup_ratio=0.025, eta_min=2e-5)
hybrid_zero_optimizer = dict(
    overlap_sync_grad=True, overlap_sync_param=True, reduce_bucket_size=512 * 1024**2, clip_grad_norm=1.0
)
loss = dict(label_smoothing=0.0)
ckpt = dict(checkpoint_every=500, keep_last=3, auto_resume=True)
