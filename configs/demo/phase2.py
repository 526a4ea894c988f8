# Demo phase 2: the mixture shifts towards source code and the sequence length doubles (256 tokens, so
# half the sequences per micro-batch keep the tokens per step); a fresh warm-up and cosine from a lower peak.
_base_ = "base.py"
DEMO_DATA = "data_cache/demo"

data = dict(
    seq_len=256,
    micro_bsz=4,
    total_steps=150,
    train_folder={f"{DEMO_DATA}/docs": 0.5, f"{DEMO_DATA}/code": 0.5},
)
adam = dict(lr=1.5e-3)
lr_scheduler = dict(warmup_ratio=0.05, eta_min=1.5e-4)
phase = dict(name="phase2")
