"""The loss train.py reports is the mean token cross-entropy of the step's global batch, recomputed here."""

import os

import torch
import torch.nn.functional as F

from internlm.config import load_run_config
from internlm.data import build_train_loader
from internlm.model import InternLM
from train_utils import run_train, step_losses, write_base


def test_step_loss_is_the_mean_token_cross_entropy_of_the_global_batch(reference_run, tmp_path, demo_data):
    """One step from the reference run's final weights (`ckpt.load_ckpt_folder`: weights only, the data from its
    start): the logged loss equals sum(F.cross_entropy over every label token of the 4 micro-batches) / label tokens,
    computed here from the same weights and the loader's first global batch. A wrong normalisation (per micro-batch
    mean, one token too few, the rank's instead of the global count) moves it by 1e-3 relative or more; fp32
    summation order by about 1e-7 (tolerance 1e-5)."""
    weights = os.path.join(reference_run.work_dir, "checkpoints", "6")
    work_dir = str(tmp_path / "run")
    config = write_base(str(tmp_path / "cfg"), demo_data, work_dir)
    sets = [f"ckpt.load_ckpt_folder={weights}", "data.total_steps=1"]
    run_train([config], sets=sets)
    logged = step_losses(work_dir)[1]

    run = load_run_config(config, sets)
    batch = build_train_loader(run.data, run.seed, 0, 1).next_global_batch()
    model = InternLM.from_pretrained(weights)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for mb in batch:
            logits = model(mb["input_ids"], mb["cu_seqlens"], mb["position_ids"], mb["max_seqlen"])
            labels = mb["labels"].reshape(-1).long()
            total += float(F.cross_entropy(logits.reshape(labels.numel(), -1).double(), labels, reduction="sum"))
            tokens += int((labels != -100).sum())
    assert tokens == sum(mb["label_tokens"] for mb in batch) > 0
    assert abs(logged - total / tokens) <= 1e-5 * logged, (logged, total / tokens)
