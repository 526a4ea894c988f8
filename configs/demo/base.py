# The demo: a small InternLM trained on CPU in a few minutes on text that ships with Python itself
# (the standard library's documentation topics and source code). The corpus and a SentencePiece
# tokenizer are built into data_cache/demo on the first run and reused afterwards.
JOB_NAME = "demo"
work_dir = "work_dirs/demo"
seed = 1024

DEMO_DATA = "data_cache/demo"

model = dict(
    hidden_size=256,
    num_layers=4,
    num_attention_heads=8,
    num_kv_attention_heads=4,
    mlp_ratio=8 / 3,
    multiple_of=64,
    vocab_size=2048,
    dtype="torch.float32",
    attn_backend="auto",
)
parallel = dict(tensor=1, pipeline=dict(size=1, interleaved_overlap=False), zero1=-1, sequence_parallel=False)
data = dict(
    micro_bsz=8,
    micro_num=2,
    valid_every=50,
    valid_ratio=0.02,
    valid_max_samples=32,
    valid_micro_num=8,
    block_seqs=256,
    prepare_demo_data=True,
    demo_cache_dir=DEMO_DATA,
    tokenizer_path=f"{DEMO_DATA}/tokenizer.model",
)
adam = dict(lr=3e-3, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.01)
hybrid_zero_optimizer = dict(clip_grad_norm=1.0)
ckpt = dict(checkpoint_every=100, keep_last=2)
# Downstream tasks scored during training (docs/evaluation.md), built before the run from the held-out tail of
# the demo corpus: pick the true next line of held-out docs / code among 4 (chance 0.25), held-out perplexity.
evaluation = dict(
    every=75,
    prepare_demo_tasks=f"{DEMO_DATA}/eval",
    tasks=[
        dict(name="next_line", kind="multiple_choice", path=f"{DEMO_DATA}/eval/next_line.jsonl"),
        dict(name="heldout_docs", kind="perplexity", path=f"{DEMO_DATA}/eval/heldout_docs.jsonl"),
        dict(name="heldout_code", kind="perplexity", path=f"{DEMO_DATA}/eval/heldout_code.jsonl"),
    ],
)
