# InternLM-7B pretraining: shared settings of every phase. Phase files set data, budget and schedule.
#
# Layout for 128 GPUs (16 nodes x 8): pure data parallel (tensor 1, pipeline 1) with hybrid ZeRO-1 inside
# each node (zero1=8). Global batch: 128 x micro_bsz 1 x micro_num 8 = 1,024 sequences of 2,048 tokens = 2.1M
# tokens per step. Memory per 80 GB GPU (python tools/plan.py --config configs/internlm_7b/phase1.py --devices 128):
# model states 54.5 GiB + activations of one 2,048-token micro-batch 12.4 GiB + loss peak 1.6 GiB = 68.5 GiB;
# micro_bsz 2 (4,096 tokens per micro-batch) would need 82.4 GiB without activation checkpointing.
JOB_NAME = "internlm_7b"
work_dir = "work_dirs/internlm_7b"
seed = 1024

model = dict(
    preset="internlm-7b",  # hidden 4096, 32 layers, 32 heads, vocab 103168, MLP 11008
    dtype="torch.bfloat16",
    checkpoint=False,
    use_flash_attn=True,
)
parallel = dict(tensor=1, pipeline=dict(size=1, interleaved_overlap=True), zero1=8, sequence_parallel=False)
data = dict(seq_len=2048, micro_bsz=1, micro_num=8, valid_every=1000, valid_ratio=0.001)
adam = dict(lr=3e-4, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1)
lr_scheduler = dict(warmup_ratio=0.025, eta_min=3e-5)
hybrid_zero_optimizer = dict(
    overlap_sync_grad=True, overlap_sync_param=True, reduce_bucket_size=512 * 1024**2, clip_grad_norm=1.0
)
ckpt = dict(checkpoint_every=1000, keep_last=3)
