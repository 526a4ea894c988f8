"""The research API of the model: intermediate_size and rope_scaling in the config (presets, schema, to/from dict),
``model(ids, labels=...)`` against transformers' loss, dynamic NTK / linear rope against transformers' Llama."""

import json

import pytest
import torch
from test_model import _hf_llama

from internlm.config import ConfigError, load_config
from internlm.config.model_config import model_config_from
from internlm.kernels import rotary_cos_sin
from internlm.labels import IGNORE_INDEX
from internlm.model import InternLM, InternLMConfig
from internlm.model.hf import to_hf_name


def _tiny(**overrides) -> InternLMConfig:
    values = dict(num_kv_attention_heads=2, attn_backend="sdpa", rope_base=500.0)
    values.update(overrides)
    return InternLMConfig.preset("internlm-tiny", **values)


# ---------------------------------------------------------------- config
def test_intermediate_size_given_or_derived():
    assert InternLMConfig.preset("internlm-7b").intermediate_size == 11008  # 4096 * 8/3 rounded up to 256
    cfg = _tiny(intermediate_size=100)
    model = InternLM(cfg)
    assert model.layers["0"].mlp.up_proj.weight.shape == (100, 64)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="intermediate_size"):
        _tiny(intermediate_size=0)


def test_presets_match_published_configs():
    """internlm/internlm-7b and internlm/internlm-20b config.json on the Hugging Face hub: "bias" true / false,
    intermediate_size 11008 / 13824, max_position_embeddings 2048 / 4096, "rotary": {"type": "dynamic"} (factor 1)."""
    published = {
        "internlm-7b": dict(bias=True, hidden=4096, layers=32, heads=32, inter=11008, max_pos=2048),
        "internlm-20b": dict(bias=False, hidden=5120, layers=60, heads=40, inter=13824, max_pos=4096),
    }
    for name, p in published.items():
        cfg = InternLMConfig.preset(name)
        got = (cfg.qkvo_bias, cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads, cfg.intermediate_size)
        assert got == (p["bias"], p["hidden"], p["layers"], p["heads"], p["inter"]), name
        assert cfg.max_position_embeddings == p["max_pos"] and cfg.vocab_size == 103168, name
        assert cfg.rope_scaling == {"type": "dynamic", "factor": 1.0} and cfg.rope_base == 10000.0, name
    assert abs(InternLMConfig.preset("internlm-20b").num_params() / 20.09e9 - 1) < 0.01


def test_to_dict_from_dict_round_trip_and_old_dicts():
    cfg = _tiny(intermediate_size=96, rope_scaling={"rope_type": "dynamic", "factor": 2})
    assert cfg.rope_scaling == {"type": "dynamic", "factor": 2.0}  # canonical form
    again = InternLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.to_dict() == cfg.to_dict()
    old = _tiny().to_dict()  # a meta.json written before the two fields existed
    del old["intermediate_size"], old["rope_scaling"]
    loaded = InternLMConfig.from_dict(old)
    assert loaded.intermediate_size == 176 and loaded.rope_scaling is None  # ceil(64 * 8/3) = 171 -> multiple of 16
    with pytest.raises(ValueError, match="unknown InternLMConfig fields bogus"):
        InternLMConfig.from_dict({**old, "bogus": 1})


@pytest.mark.parametrize(
    "scaling, message",
    [
        ({"type": "yarn", "factor": 2.0}, "type 'yarn' is not supported; use one of dynamic, linear"),
        ({"type": "dynamic"}, "factor must be a positive number, got None"),
        ({"type": "dynamic", "factor": 2.0, "low_freq_factor": 1.0}, "unknown keys low_freq_factor"),
        ("dynamic", "must be None or a dict"),
    ],
)
def test_rope_scaling_rejected_with_clear_errors(scaling, message):
    with pytest.raises(ValueError, match=message):
        _tiny(rope_scaling=scaling)


def test_config_keys(tmp_path):
    path = tmp_path / "run.py"
    path.write_text(
        "model = dict(preset='internlm-tiny', intermediate_size=80, rope_scaling=dict(type='linear', factor=4))\n"
        "data = dict(total_steps=1)\n"
    )
    mc = model_config_from(load_config(str(path)))
    assert mc.intermediate_size == 80 and mc.rope_scaling == {"type": "linear", "factor": 4.0}
    preset = tmp_path / "preset.py"
    preset.write_text("model = dict(preset='internlm-20b', num_layers=2)\ndata = dict(total_steps=1)\n")
    mc = model_config_from(load_config(str(preset)))
    assert mc.rope_scaling == {"type": "dynamic", "factor": 1.0} and not mc.qkvo_bias and mc.intermediate_size == 13824
    bad = tmp_path / "bad.py"
    bad.write_text("model = dict(preset='internlm-tiny', rope_scaling=dict(type='ntk', factor=2.0))\n")
    with pytest.raises(ConfigError, match=r"model\.rope_scaling: rope_scaling type 'ntk' is not supported"):
        load_config(str(bad))


# ---------------------------------------------------------------- loss
def test_labels_loss_equals_transformers():
    torch.manual_seed(0)
    cfg = _tiny()
    model = InternLM(cfg)
    hf = _hf_llama(cfg, model)
    ids = torch.randint(0, 256, (3, 14))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    labels[2, 9:] = IGNORE_INDEX
    loss = model(ids, labels=labels)
    ref = hf(ids, labels=labels).loss
    assert loss.dim() == 0
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    loss.backward()
    ref.backward()
    for name, param in model.named_parameters():
        hf_param = hf.get_parameter(to_hf_name(name))
        torch.testing.assert_close(param.grad, hf_param.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    model.fuse_head_loss = True  # the trainer's head setting does not change the loss call
    torch.testing.assert_close(model(ids, labels=labels), ref, rtol=1e-6, atol=1e-6)
    assert model(ids).hidden.shape == (3, 14, 64)  # ... nor the logits call's HeadInput


# ---------------------------------------------------------------- rope scaling
@pytest.mark.parametrize("kind, factor", [("dynamic", 2.0), ("dynamic", 1.0), ("linear", 2.0)])
def test_rope_scaling_equals_transformers_beyond_max_positions(kind, factor):
    torch.manual_seed(1)
    cfg = _tiny(max_position_embeddings=16, rope_scaling={"type": kind, "factor": factor})
    model = InternLM(cfg)
    hf = _hf_llama(cfg, model)
    ids = torch.randint(0, 256, (2, 40))  # 40 > max_position_embeddings
    logits = model(ids)
    torch.testing.assert_close(logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    plain = InternLM(_tiny(max_position_embeddings=16))
    assert (plain(ids) - logits).abs().max() > 1e-3  # the scaling changed the result
    if kind == "dynamic":  # within max_position_embeddings nothing changes: the same values bit for bit
        assert torch.equal(plain(ids[:, :16]), model(ids[:, :16]))


def test_dynamic_base_formula():
    """cos/sin of a 40-token forward with M = 16, F = 2, D = 16: base * (2 * 40 / 16 - 1) ** (16 / 14)."""
    pos = torch.arange(40)
    scaled = rotary_cos_sin(pos, 16, 500.0, scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=16,
                            seq_len=40)  # fmt: skip
    expected = rotary_cos_sin(pos, 16, 500.0 * 4.0 ** (16 / 14))
    torch.testing.assert_close(scaled, expected, rtol=0, atol=1e-6)
    short = rotary_cos_sin(pos[:16], 16, 500.0, scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=16,
                           seq_len=16)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(short, rotary_cos_sin(pos[:16], 16, 500.0)))
    with pytest.raises(ValueError, match="needs max_position_embeddings and seq_len"):
        rotary_cos_sin(pos, 16, 500.0, scaling={"type": "dynamic", "factor": 2.0})


def test_packed_training_forward_uses_max_seqlen_without_sync(monkeypatch):
    """The trainer's call (PackedDocs with host-side bounds, position_ids, max_seqlen): with dynamic scaling the
    sequence length is max_seqlen (no device read), and the values equal the unpacked rows'."""
    from internlm.model import PackedDocs

    torch.manual_seed(2)
    model = InternLM(_tiny(max_position_embeddings=8, rope_scaling={"type": "dynamic", "factor": 2.0}))
    ids = torch.randint(0, 256, (2, 12))
    docs = PackedDocs(torch.tensor([0, 12, 24], dtype=torch.int32), [0, 12, 24], 12)
    pos = torch.arange(12).repeat(2)[None]

    def host_sync(*args):
        raise AssertionError("host sync in the training forward")

    with monkeypatch.context() as patch:
        for method in ("item", "tolist", "__int__", "__index__", "__bool__"):
            patch.setattr(torch.Tensor, method, host_sync)
        packed = model(ids.reshape(1, -1), cu_seqlens=docs, position_ids=pos, max_seqlen=12)
    torch.testing.assert_close(packed.reshape(2, 12, -1), model(ids), rtol=1e-5, atol=1e-5)


def test_dynamic_rope_length_from_explicit_positions():
    """Positions given without max_seqlen (a continuation at offset 30): L = max position + 1, as transformers."""
    torch.manual_seed(3)
    cfg = _tiny(max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 2.0})
    model = InternLM(cfg)
    hf = _hf_llama(cfg, model)
    ids, pos = torch.randint(0, 256, (1, 10)), torch.arange(30, 40)[None]
    torch.testing.assert_close(model(ids, position_ids=pos), hf(ids, position_ids=pos).logits, rtol=1e-5, atol=1e-5)
