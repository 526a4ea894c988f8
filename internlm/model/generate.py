"""Sampling from a trained model (no KV cache: short demo samples only)."""

from __future__ import annotations

from typing import List, Optional

import torch

from .modeling import HeadInput, InternLM


@torch.no_grad()
def generate(
    model: InternLM,
    prompt_ids: List[int],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: Optional[int] = 40,
    eos_id: Optional[int] = None,
    seed: int = 0,
) -> List[int]:
    """Extend `prompt_ids` by sampling; stops at `eos_id` or after `max_new_tokens` tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt_ids)
    window = model.config.max_position_embeddings
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-window:]], device=device)
        out = model(x)
        logits = (out.logits() if isinstance(out, HeadInput) else out)[0, -1].float().cpu()
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        ids.append(next_id)
        if eos_id is not None and next_id == eos_id:
            break
    model.train(was_training)
    return ids
