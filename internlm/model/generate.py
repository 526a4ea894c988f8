"""Sampling from a model with a KV cache: a batch of prompts of different lengths, greedy or sampled, stop on EOS.

    ids = generate(model, [1, 2, 3], max_new_tokens=32, temperature=0)                 # one prompt -> List[int]
    rows = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.8, top_k=40, top_p=0.9, eos_id=2)

Prompts are left-padded into one (B, P) batch with an attention mask; each row's positions count its own tokens
(`internlm.model.kv_cache`), so a row is generated as if it were alone. The prompt runs once, then every step feeds
one token per row and reuses the cached keys/values (`InternLM.decode`: a model whose layers the trainer wrapped
for checkpointing or compilation generates through the same unwrapped path). Each step picks, from the fp32
logits z of a row's last token:

    temperature == 0: argmax z (greedy; transformers' ``do_sample=False``)
    else: z / temperature -> keep the top_k largest -> keep the smallest set of most likely tokens whose probability
          sums to >= top_p -> sample from the softmax with a CPU generator seeded by ``seed``

A row stops after it emits ``eos_id`` (included in its output) or after ``max_new_tokens`` tokens; the batch stops
when every row has.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from .kv_cache import KVCache
from .modeling import InternLM

Prompts = Union[Sequence[int], Sequence[Sequence[int]]]


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: Optional[int] = None, top_p: Optional[float] = None
) -> torch.Tensor:
    """(B, V) fp32 logits -> logits / temperature with every token outside top_k / top_p set to -inf.

    top_p keeps, per row, the most likely tokens up to and including the first whose cumulative probability
    reaches top_p (always at least one), as transformers' TopPLogitsWarper."""
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, index = torch.sort(logits, dim=-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= top_p  # the probability before this token already reaches top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, index, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: InternLM,
    prompt_ids: Prompts,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: Optional[int] = 40,
    eos_id: Optional[int] = None,
    seed: int = 0,
    top_p: Optional[float] = None,
    pad_id: int = 0,
) -> Union[List[int], List[List[int]]]:
    """Extend each prompt by up to ``max_new_tokens`` tokens (see the module docstring for the rule).

    ``prompt_ids``: one prompt (a list of ints; returns one list) or a batch of prompts (a list of lists, possibly
    of different lengths; returns one list per prompt). Each returned list is the prompt followed by its new
    tokens, the EOS included when it was emitted. ``pad_id`` fills the left padding (masked out: any id works).
    """
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    single = len(prompt_ids) > 0 and not isinstance(prompt_ids[0], (list, tuple, torch.Tensor))
    prompts = [list(map(int, prompt_ids))] if single else [list(map(int, p)) for p in prompt_ids]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batch, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    outputs = [list(p) for p in prompts]
    done = [False] * batch
    cache = KVCache(batch, longest + max_new_tokens)
    try:
        step_ids, step_mask = ids.to(device), mask.to(device)
        for _ in range(max_new_tokens):
            # (B, V) fp32 logits of each row's last token: `InternLM.decode`, the path no trainer wrapper touches
            logits = model.decode(step_ids, cache, attention_mask=step_mask, last_only=True)[:, -1].float().cpu()
            if temperature <= 0:
                next_ids = logits.argmax(-1)
            else:
                probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
                next_ids = torch.multinomial(probs, 1, generator=gen)[:, 0]
            for row, token in enumerate(next_ids.tolist()):
                if not done[row]:
                    outputs[row].append(token)
                    done[row] = eos_id is not None and token == eos_id
            if all(done):
                break
            # a finished row keeps feeding tokens (ignored) so that the batch stays rectangular
            step_ids = next_ids[:, None].to(device)
            step_mask = torch.ones(batch, 1, dtype=torch.long, device=device)
    finally:
        model.train(was_training)
    return outputs[0] if single else outputs


__all__ = ["filter_logits", "generate"]
