"""The model on its own: shapes, packing, attention backends, presets, init determinism, FLOPs."""

import math

import pytest
import torch
import torch.nn.functional as F

from internlm.model import InternLM, InternLMConfig, packed_causal_attention
from internlm.model.hf import to_hf_name


def _set_backend(model: InternLM, backend: str) -> None:
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return InternLM(InternLMConfig.preset("internlm-tiny", num_kv_attention_heads=2, attn_backend="sdpa"))


def test_logits_shape(tiny):
    ids = torch.randint(0, 256, (3, 10))
    assert tiny(ids).shape == (3, 10, 256)


def test_packed_equals_separate_documents(tiny):
    docs = [torch.randint(0, 256, (n,)) for n in (5, 9, 2)]
    packed = torch.cat(docs)[None]
    cu = torch.tensor([0, 5, 14, 16], dtype=torch.int32)
    out = tiny(packed, cu_seqlens=cu)[0]
    separate = torch.cat([tiny(d[None])[0] for d in docs])
    torch.testing.assert_close(out, separate, rtol=1e-5, atol=1e-5)


def test_no_attention_across_documents(tiny):
    a, b1, b2 = torch.randint(0, 256, (6,)), torch.randint(0, 256, (4,)), torch.randint(0, 256, (4,))
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    out1 = tiny(torch.cat([a, b1])[None], cu_seqlens=cu)[0, :6]
    out2 = tiny(torch.cat([a, b2])[None], cu_seqlens=cu)[0, :6]
    assert torch.equal(out1, out2)


@pytest.mark.parametrize("cu", [[0, 16, 32], [0, 3, 20, 21, 32], [0, 100, 130, 300, 301, 640], [0, 500, 510, 700]])
def test_attention_backends_agree(cu):
    """Includes packings that the sdpa backend splits into several padded document groups."""
    torch.manual_seed(1)
    total = cu[-1]
    q, k, v = torch.randn(total, 4, 8), torch.randn(total, 2, 8), torch.randn(total, 2, 8)
    cu = torch.tensor(cu, dtype=torch.int32)
    ref = packed_causal_attention(q, k, v, cu, backend="reference")
    sdpa = packed_causal_attention(q, k, v, cu, backend="sdpa")
    torch.testing.assert_close(sdpa, ref, rtol=1e-5, atol=1e-5)


def test_model_backends_agree(tiny):
    ids = torch.randint(0, 256, (1, 24))
    cu = torch.tensor([0, 7, 24], dtype=torch.int32)
    _set_backend(tiny, "reference")
    ref = tiny(ids, cu_seqlens=cu)
    _set_backend(tiny, "sdpa")
    torch.testing.assert_close(tiny(ids, cu_seqlens=cu), ref, rtol=1e-5, atol=1e-5)


def test_flash_backend_requires_package():
    from internlm.model import flash_attn_available

    if flash_attn_available():
        pytest.skip("flash-attn installed")
    with pytest.raises(RuntimeError, match="flash-attn"):
        packed_causal_attention(
            torch.randn(4, 2, 8),
            torch.randn(4, 2, 8),
            torch.randn(4, 2, 8),
            torch.tensor([0, 4], dtype=torch.int32),
            backend="flash",
        )


def test_init_is_deterministic_and_scaled():
    cfg = InternLMConfig.preset("internlm-tiny")
    m1, m2 = InternLM(cfg), InternLM(cfg)
    for (n1, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p1, p2), n1
    m3 = InternLM(cfg)
    m3.init_weights(seed=7)
    assert not torch.equal(m3.embed_tokens.weight, m1.embed_tokens.weight)
    std_q = m1.layers["0"].self_attn.q_proj.weight.std().item()
    std_o = m1.layers["0"].self_attn.o_proj.weight.std().item()
    assert abs(std_q - 0.02) < 0.004
    assert abs(std_o - 0.02 / math.sqrt(2 * cfg.num_layers)) < 0.003
    assert torch.all(m1.layers["0"].self_attn.q_proj.bias == 0)
    assert torch.all(m1.norm.weight == 1)


def test_preset_sizes():
    cfg = InternLMConfig.preset("internlm-7b")
    assert cfg.intermediate_size == 11008
    assert abs(cfg.num_params() / 7.3e9 - 1) < 0.01


def test_104b_on_meta_device():
    cfg = InternLMConfig.preset("internlm-104b")
    with torch.device("meta"):
        model = InternLM(cfg)
    counted = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert counted == cfg.num_params()
    assert abs(counted / 104e9 - 1) <= 0.03


def test_flops_per_token_formula():
    cfg = InternLMConfig.preset("internlm-7b")
    n_matmul = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 103168
    expected = 3 * (2 * n_matmul + 2 * 32 * 2048 * 4096)
    assert cfg.flops_per_token(2048) == expected


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible"):
        InternLMConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(KeyError, match="known presets"):
        InternLMConfig.preset("internlm-9b")


def test_bf16_forward_and_backward():
    model = InternLM(InternLMConfig.preset("internlm-tiny", dtype="torch.bfloat16"))
    ids = torch.randint(0, 256, (2, 8))
    logits = model(ids)
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert model.layers["1"].mlp.down_proj.weight.grad.dtype == torch.bfloat16


def _hf_llama(cfg: InternLMConfig, model: InternLM):
    """transformers' LlamaForCausalLM of the same shape and weights (InternLM = LLaMA with q/k/v/o biases)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf(), attn_implementation="sdpa"))
    hf.load_state_dict({to_hf_name(k): v for k, v in model.state_dict().items()}, strict=True)
    return hf


def test_matches_hugging_face_llama():
    """The fused-kernel model (eager fallback on the CPU) against transformers' LlamaForCausalLM: logits of a batch,
    packed documents against the documents run separately, and the gradients of the summed token loss."""
    torch.manual_seed(3)
    cfg = InternLMConfig.preset("internlm-tiny", num_kv_attention_heads=2, attn_backend="sdpa", rope_base=500.0)
    model = InternLM(cfg)
    hf = _hf_llama(cfg, model)
    ids = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)

    lengths = (5, 19, 8)
    docs = [torch.randint(0, 256, (n,)) for n in lengths]
    cu = torch.tensor([0, 5, 24, 32], dtype=torch.int32)
    packed = model(torch.cat(docs)[None], cu_seqlens=cu)[0]
    separate = torch.cat([hf(d[None]).logits[0] for d in docs])
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)

    labels = torch.randint(0, 256, (32,))
    F.cross_entropy(packed, labels, reduction="sum").backward()
    F.cross_entropy(separate, labels, reduction="sum").backward()
    for name, param in model.named_parameters():
        hf_param = hf.get_parameter(to_hf_name(name))
        torch.testing.assert_close(param.grad, hf_param.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_fused_kernels_are_the_model_path(monkeypatch):
    """Norms, rotary and SwiGLU run through internlm.kernels (here their eager fallback); cos/sin are computed
    once per forward for all layers."""
    from internlm.kernels import dispatch
    from internlm.model import modeling

    model = InternLM(InternLMConfig.preset("internlm-tiny", num_layers=3))
    calls = []
    original = modeling.rotary_cos_sin
    monkeypatch.setattr(modeling, "rotary_cos_sin", lambda *a, **k: calls.append(1) or original(*a, **k))
    dispatch.CALLS.clear()
    model(torch.randint(0, 256, (2, 8))).sum().backward()
    assert len(calls) == 1
    counted = {op: n for (op, _), n in dispatch.CALLS.items()}
    assert counted == {"rms_norm": 2 * 3 + 1, "apply_rotary": 2 * 2 * 3, "swiglu": 3}, dict(dispatch.CALLS)


def test_generate_with_fused_head():
    """A chunk that returns HeadInput (the trainer's) still samples."""
    from internlm.model import HeadInput, generate

    model = InternLM(InternLMConfig.preset("internlm-tiny"))
    model.fuse_head_loss = True
    assert isinstance(model(torch.randint(0, 256, (1, 4))), HeadInput)
    assert len(generate(model, [1, 2, 3], max_new_tokens=4, seed=0)) == 7


def test_resolve_backend_is_one_rule():
    """`resolve_backend` decides "auto" for the model, the banner and a planner asking about another machine."""
    from internlm.model.attention import resolve_backend

    assert resolve_backend("auto", "cuda", torch.bfloat16, flash_installed=True) == "flash"
    assert resolve_backend("auto", torch.device("cuda"), torch.float32, flash_installed=True) == "sdpa"
    assert resolve_backend("auto", "cpu", torch.bfloat16, flash_installed=True) == "sdpa"
    assert resolve_backend("auto", "cuda", torch.float16, flash_installed=False) == "sdpa"
    assert resolve_backend("reference", "cpu", torch.float32) == "reference"
    with pytest.raises(RuntimeError, match="needs the flash-attn package"):
        resolve_backend("flash", "cuda", torch.bfloat16, flash_installed=False)
    with pytest.raises(RuntimeError, match="fp16/bf16 only"):
        resolve_backend("flash", "cuda", torch.float32, flash_installed=True)
    with pytest.raises(ValueError, match="unknown attention backend 'xla'"):
        resolve_backend("xla", "cpu")
