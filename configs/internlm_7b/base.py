# InternLM-7B pretraining: shared settings of every phase. Phase files set data, budget and schedule.
#
# Layout for 128 A100-80GB (16 nodes x 8): pure data parallel (tensor 1, pipeline 1), ZeRO-1 over the whole
# data-parallel group, no activation checkpointing: the planner's best at this global batch in both phases
# (python tools/plan.py --config configs/internlm_7b/phase1.py --devices 128 --device-type a100-80gb --recommend).
# Global batch: 128 x micro_bsz 1 x micro_num 8 = 1,024 sequences of 2,048 tokens = 2.1M tokens per step.
# The planner's figures (same command without --recommend): 50.9 GiB per GPU (weights 13.6 + fp32 gradients 27.5
# + optimizer 0.6 + activations of one 2,048-token micro-batch 8.9 + transient 0.3), step 4.52 s = 3,628
# tokens/GPU/s, 50.0% MFU at its assumed 50% matmul efficiency. zero1 sizes tie on step time (the data-parallel
# traffic hides under the compute); the ranking takes the one with the most memory headroom: zero1=8 (hybrid, inside
# a node) gives the same step at 63.7 GiB. Tensor 2 + sequence parallel, the fastest with tensor > 1, gives 48.4%.
JOB_NAME = "internlm_7b"
work_dir = "work_dirs/internlm_7b"
seed = 1024

model = dict(
    preset="internlm-7b",  # hidden 4096, 32 layers, 32 heads, vocab 103168, MLP 11008
    dtype="torch.bfloat16",
    checkpoint=False,
    use_flash_attn=True,
)
parallel = dict(tensor=1, pipeline=dict(size=1, interleaved_overlap=True), zero1=-1, sequence_parallel=False)
data = dict(seq_len=2048, micro_bsz=1, micro_num=8, valid_every=1000, valid_ratio=0.001)
adam = dict(lr=3e-4, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1)
lr_scheduler = dict(warmup_ratio=0.025, eta_min=3e-5)
hybrid_zero_optimizer = dict(
    overlap_sync_grad=True, overlap_sync_param=True, reduce_bucket_size=512 * 1024**2, clip_grad_norm=1.0
)
ckpt = dict(checkpoint_every=1000, keep_last=3)
