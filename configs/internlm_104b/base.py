# InternLM-104B pretraining: shared settings of every phase (model, layout, optimizer).
# Phase files build on this one with `_base_ = "base.py"` and set what changes.
#
# Layout for 2,048 GPUs (256 nodes x 8): tensor 8 inside a node, pipeline 4 with 2 interleaved chunks,
# data 64; ZeRO-1 over 8 data ranks (hybrid: optimizer states sharded inside groups of 8, gradients reduced
# over all 64). Global batch: 64 data ranks x micro_bsz 1 x micro_num 32 = 2,048 sequences x 2,048 tokens
# = 4.2M tokens per step. Run `python train.py --config configs/internlm_104b/phase1.py ... --dry-run
# --world-size 2048` to see the plan.
JOB_NAME = "internlm_104b"
work_dir = "work_dirs/internlm_104b"
seed = 1024

SEQ_LEN = 2048


model = dict(
    preset="internlm-104b",  # hidden 10240, 82 layers, 80 heads of 128, vocab 65536
    dtype="torch.bfloat16",
    checkpoint=True,  # recompute activations: 104B does not fit otherwise
    num_chunks=2,
    use_flash_attn=True,
)

parallel = dict(
    tensor=dict(size=8, mode="mtp"),
    pipeline=dict(size=4, interleaved_overlap=True),
    zero1=dict(size=8, fsdp=False),
    sequence_parallel=True,
)

data = dict(seq_len=SEQ_LEN, micro_bsz=1, micro_num=32, valid_every=1000, valid_micro_num=4, valid_ratio=0.001)

adam = dict(lr=2e-4, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.1)
lr_scheduler = dict(warmup_ratio=0.025, eta_min=2e-5)
hybrid_zero_optimizer = dict(
    overlap_sync_grad=True, overlap_sync_param=True, reduce_bucket_size=512 * 1024**2, clip_grad_norm=1.0
)
loss = dict(label_smoothing=0.0)
ckpt = dict(checkpoint_every=500, keep_last=3, auto_resume=True)
