"""Generation: KV cache against full recomputation, batched greedy decoding against transformers' generate,
sampling filters against transformers' warpers, EOS per row, and tools/generate.py on a checkpoint of train.py."""

import os
import subprocess
import sys

import pytest
import torch
from test_model import _hf_llama

from internlm.model import InternLM, InternLMConfig, generate
from internlm.model.generate import filter_logits
from internlm.model.kv_cache import KVCache
from train_utils import REPO

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [200, 3, 4, 90, 17]]


def _tiny(**overrides) -> InternLMConfig:
    values = dict(num_kv_attention_heads=2, attn_backend="sdpa", rope_base=500.0)
    values.update(overrides)
    return InternLMConfig.preset("internlm-tiny", **values)


def _hf_greedy(hf, prompts, new_tokens: int):
    """transformers' greedy generate on the left-padded batch; each row's prompt + new tokens."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p) :] = torch.tensor(p)
        mask[row, longest - len(p) :] = 1
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=new_tokens,
        pad_token_id=0,
        eos_token_id=None,
    )
    return [out[row, longest - len(p) :].tolist() for row, p in enumerate(prompts)]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"max_position_embeddings": 12, "rope_scaling": {"type": "dynamic", "factor": 2.0}}],
    ids=["plain", "dynamic-ntk-beyond-max-positions"],
)
def test_greedy_batch_equals_transformers(overrides):
    torch.manual_seed(0)
    model = InternLM(_tiny(**overrides))
    hf = _hf_llama(model.config, model).eval()
    ours = generate(model, PROMPTS, max_new_tokens=16, temperature=0)
    assert ours == _hf_greedy(hf, PROMPTS, 16)
    assert [len(row) for row in ours] == [len(p) + 16 for p in PROMPTS]
    assert generate(model, PROMPTS[1], max_new_tokens=16, temperature=0) == ours[1]  # alone = in the batch


def test_kv_cache_logits_equal_full_recompute():
    """A padded batch fed through the cache in pieces (prompt, single tokens, a chunk) gives every row's logits of
    a full forward of that row alone."""
    torch.manual_seed(1)
    model = InternLM(_tiny(qkvo_bias=True)).eval()
    rows = [torch.randint(0, 256, (n,)) for n in (9, 4, 7)]
    new = torch.randint(0, 256, (3, 6))  # appended after each row's prompt
    longest = max(len(r) for r in rows)
    ids = torch.zeros(3, longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, longest - len(r) :], mask[i, longest - len(r) :] = r, 1
    cache = KVCache(3, 4)  # too small on purpose: the buffers grow
    with torch.no_grad():
        pieces = [model.decode(ids, cache, attention_mask=mask)]
        pieces += [model.decode(new[:, i : i + 1], cache) for i in range(2)]
        pieces.append(model.decode(new[:, 2:], cache))
        cached = torch.cat(pieces, dim=1)
        for i, r in enumerate(rows):
            full = model(torch.cat([r, new[i]])[None])[0]
            torch.testing.assert_close(cached[i, longest - len(r) :], full, rtol=1e-5, atol=1e-5)
    assert cache.length == longest + 6 and cache.seen.tolist() == [len(r) + 6 for r in rows]


def test_generate_through_trainer_wrappers(monkeypatch):
    """A model whose layers the trainer wrapped (whole-layer recomputation) generates through the layers' ``decode``,
    which the wrappers leave alone: the same tokens, and no checkpoint wrapper runs."""
    from internlm.train import activation_checkpoint

    torch.manual_seed(5)
    model = InternLM(_tiny())
    plain = generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    assert activation_checkpoint.apply_activation_checkpointing(model, True) == model.config.num_layers

    def wrapped(*args, **kwargs):
        raise AssertionError("generation went through a checkpoint wrapper")

    monkeypatch.setattr(activation_checkpoint, "checkpoint", wrapped)
    assert generate(model, PROMPTS, max_new_tokens=6, temperature=0) == plain
    with pytest.raises(AssertionError, match="checkpoint wrapper"):  # the training forward is the wrapped one
        model(torch.tensor([PROMPTS[0]]))


def test_eos_stops_each_row():
    torch.manual_seed(2)
    model = InternLM(_tiny())
    free = generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    eos = free[0][len(PROMPTS[0]) + 2]  # row 0's third new token
    stopped = generate(model, PROMPTS, max_new_tokens=12, temperature=0, eos_id=eos)
    for prompt, row, out in zip(PROMPTS, free, stopped):
        tail = row[len(prompt) :]
        expected = row[: len(prompt) + tail.index(eos) + 1] if eos in tail else row
        assert out == expected
    assert len(stopped[0]) == len(PROMPTS[0]) + 3 and stopped[0][-1] == eos


def test_sampling_filters_equal_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(3)
    logits = torch.randn(4, 50) * 3
    ours = filter_logits(logits, 0.7, top_k=10, top_p=0.8)
    ref = TemperatureLogitsWarper(0.7)(None, logits.clone())
    ref = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, ref))
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])
    kept = (~torch.isinf(filter_logits(logits, 1.0, top_p=0.5))).sum(-1)
    assert (kept >= 1).all() and (kept < 50).all()


def test_sampling_is_seeded():
    torch.manual_seed(4)
    model = InternLM(_tiny())
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9)
    a = generate(model, PROMPTS, seed=1, **kwargs)
    assert a == generate(model, PROMPTS, seed=1, **kwargs)
    assert a != generate(model, PROMPTS, seed=2, **kwargs)
    greedy = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, top_k=1, seed=5) == greedy
    # the old call: one prompt as a list of ints, a list of ints back
    assert generate(model, PROMPTS[0], max_new_tokens=4, seed=0) == generate(model, [PROMPTS[0]], 4, seed=0)[0]


@pytest.fixture
def tiny_run(reference_run):
    """A train.py run of the tiny test config (the session's shared 6-step reference run: checkpoint at step 6, the
    demo tokenizer recorded); only read here."""
    return reference_run.work_dir


def test_tools_generate_on_checkpoint(tiny_run, tmp_path):
    from internlm.data import Tokenizer
    from internlm.model.pretrained import find_tokenizer

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("import os\n\nclass \n")
    cmd = [sys.executable, os.path.join(REPO, "tools", "generate.py"), "--model", tiny_run, "--prompt", "def main("]
    cmd += ["--prompts-file", str(prompts_file), "--max-new-tokens", "6", "--temperature", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    tokenizer = Tokenizer(find_tokenizer(tiny_run))
    model = InternLM.from_pretrained(tiny_run)
    for index, text in enumerate(["def main(", "import os", "class "]):
        ids = generate(model, tokenizer.encode(text), max_new_tokens=6, temperature=0, eos_id=tokenizer.eos_id)
        assert f"### {index}: {text!r}" in out.stdout
        # text=True reads stdout with universal newlines: a generated "\r" arrives as "\n"
        assert tokenizer.decode(ids).replace("\r\n", "\n").replace("\r", "\n") in out.stdout
    assert "### 3" not in out.stdout  # the blank line is no prompt
