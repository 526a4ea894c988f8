"""Every ConfigError is one line ``FILE: key.path: problem`` naming the file the user passed."""

import os
import textwrap

import pytest

from internlm.config import ConfigError, load_config
from internlm.model.config import InternLMConfig
from internlm.problems import Problem

VALID = "model = dict(preset='internlm-tiny')\ndata = dict(seq_len=32, total_steps=10)\n"

CASES = [
    # (id, extra config text, overrides, key in the message, problem pattern)
    (
        "unknown-nested",
        "model['hiden_size'] = 8",
        [],
        "model.hiden_size",
        "unknown key 'model.hiden_size' (did you mean 'hidden_size'?)",
    ),
    (
        "unknown-set",
        "",
        ["model.hiden_size=8"],
        "--set model.hiden_size",
        "unknown key 'model.hiden_size' (did you mean 'hidden_size'?)",
    ),
    ("unknown-top", "modle = dict(num_layers=2)", [], "modle", "(did you mean 'model'?)"),
    ("unknown-set-section", "", ["modle.num_layers=2"], "--set modle.num_layers", "did you mean 'model'"),
    (
        "unknown-grad-scaler",
        "grad_scaler = dict(fp16=dict(init_scale=1))",
        [],
        "grad_scaler.fp16.init_scale",
        "did you mean 'initial_scale'",
    ),
    ("type-str-for-int", "data['seq_len'] = '2048'", [], "data.seq_len", "expected int, got str '2048'"),
    ("type-bool-for-int", "data['micro_num'] = True", [], "data.micro_num", "expected int, got bool True"),
    ("type-set-string", "", ["adam.lr=fast"], "--set adam.lr", "expected float, got str 'fast'"),
    ("type-section", "parallel = dict(pipeline='two')", [], "parallel.pipeline", "expected int"),
    ("set-no-equals", "", ["model.num_layers"], "--set model.num_layers", "expected key.path=value"),
    ("set-into-scalar", "", ["data.seq_len.x=1"], "--set data.seq_len.x", "'data.seq_len' is 32, not a dict"),
    (
        "heads",
        "model['hidden_size'] = 102",
        [],
        "model.hidden_size",
        "102 is not divisible by model.num_attention_heads=4",
    ),
    (
        "kv-heads",
        "model['num_kv_attention_heads'] = 3",
        [],
        "model.num_attention_heads",
        "4 is not divisible by model.num_kv_attention_heads=3",
    ),
    ("micro-num", "data['micro_num'] = 0", [], "data.micro_num", "must be >= 1, got 0"),
    ("micro-bsz", "", ["data.micro_bsz=0"], "--set data.micro_bsz", "must be >= 1, got 0"),
    ("seq-len", "data['seq_len'] = -1", [], "data.seq_len", "must be >= 1"),
    ("warmup-high", "lr_scheduler = dict(warmup_ratio=1.5)", [], "lr_scheduler.warmup_ratio", "must be <= 1"),
    ("warmup-low", "lr_scheduler = dict(warmup_ratio=-0.1)", [], "lr_scheduler.warmup_ratio", "must be >= 0"),
    (
        "eta-min",
        "adam = dict(lr=1e-5)\nlr_scheduler = dict(eta_min=1e-4)",
        [],
        "lr_scheduler.eta_min",
        "0.0001 exceeds adam.lr=1e-05",
    ),
    ("no-length", "data['total_steps'] = None", [], "data.total_steps", "set data.total_steps or data.total_tokens"),
    ("zero-length", "data['total_steps'] = 0", [], "data.total_steps", "must be >= 1"),
    ("both-lengths", "data['total_tokens'] = 1000", [], "data.total_tokens", "only one of"),
    (
        "norm-type",
        "model['norm_type'] = 'layernorm'",
        [],
        "model.norm_type",
        "'layernorm' is not supported; use one of 'rmsnorm'",
    ),
    ("attn-backend", "", ["model.attn_backend=xformers"], "--set model.attn_backend", "'xformers' is not supported"),
    (
        "flash-contradiction",
        "model.update(use_flash_attn=False, attn_backend='flash')",
        [],
        "model.attn_backend",
        "contradicts model.use_flash_attn=False",
    ),
    ("dtype", "model['dtype'] = 'torch.int8'", [], "model.dtype", "unknown dtype 'torch.int8'"),
    ("preset", "model['preset'] = 'internlm-3b'", [], "model.preset", "unknown preset 'internlm-3b'"),
    ("checkpoint-fraction", "model['checkpoint'] = 1.5", [], "model.checkpoint", "must be <= 1"),
    (
        "compat-fixed",
        "model['embed_split_hidden'] = False",
        [],
        "model.embed_split_hidden",
        "False is not supported (InternLM compatibility key, only True)",
    ),
    ("fsdp", "parallel = dict(zero1=dict(size=8, fsdp=True))", [], "parallel.zero1.fsdp", "True is not supported"),
    (
        "tensor-mode",
        "parallel = dict(tensor=dict(size=2, mode='isp'))",
        [],
        "parallel.tensor.mode",
        "'isp' is not supported",
    ),
    (
        "object-store",
        "ckpt = dict(save_ckpt_folder='boto3:s3://bucket/x')",
        [],
        "ckpt.save_ckpt_folder",
        "storage scheme 'boto3' is not supported",
    ),
    ("mixture-weight", "data['train_folder'] = {'a': 0}", [], "data.train_folder", "weight of 'a' must be positive"),
    (
        "odd-head-dim",
        "model.update(hidden_size=12, num_attention_heads=4)",
        [],
        "model.hidden_size",
        "head dimension 3 must be even",
    ),
    ("python-error", "x = UNDEFINED_NAME + 1", [], "line 3", "NameError: name 'UNDEFINED_NAME' is not defined"),
    ("syntax-error", "model = dict(\n", [], "line", "SyntaxError"),
    ("missing-base", "_base_ = 'nope.py'", [], "_base_", "base file 'nope.py' not found"),
    ("bad-base-type", "_base_ = 3", [], "_base_", "expected a path or a list of paths"),
]


@pytest.mark.parametrize("extra, overrides, key, problem", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_is_one_line_naming_file_and_key(tmp_path, extra, overrides, key, problem):
    path = str(tmp_path / "run.py")
    with open(path, "w") as f:
        f.write(VALID + extra + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}"), message
    assert problem in message, message


def test_errors_in_base_files_name_the_users_file(tmp_path):
    write = lambda name, text: (tmp_path / name).write_text(textwrap.dedent(text))  # noqa: E731
    write("base.py", "data = dict(seq_len=32)\nBROKEN = 1 / 0\n")
    write("child.py", "_base_ = 'base.py'\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "child.py"))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'child.py'}: _base_: in {tmp_path / 'base.py'}: line 2: ")
    assert "ZeroDivisionError" in message and "\n" not in message

    write("a.py", "_base_ = 'b.py'\n")
    write("b.py", "_base_ = 'a.py'\n")
    with pytest.raises(ConfigError, match="inheritance cycle"):
        load_config(str(tmp_path / "a.py"))


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "absent.py")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: config file not found"
    assert os.path.basename(path) in str(info.value)


def test_model_problems_are_records_keyed_by_field():
    problems = InternLMConfig.unchecked(hidden_size=102, num_attention_heads=4, num_kv_attention_heads=3).problems()
    assert problems == [
        Problem("hidden_size", "102 is not divisible by num_attention_heads=4"),
        Problem("num_kv_attention_heads", "3 does not divide num_attention_heads=4"),
    ]
    assert InternLMConfig.unchecked(hidden_size=12, num_attention_heads=4).problems() == [
        Problem("hidden_size", "head dimension 3 must be even for rotary embedding")
    ]
    assert InternLMConfig.unchecked(num_layers=0).problems() == [Problem("num_layers", "must be positive, got 0")]
    assert InternLMConfig().problems() == []
    with pytest.raises(ValueError) as info:
        InternLMConfig(hidden_size=102, num_attention_heads=4, num_kv_attention_heads=3)
    assert str(info.value) == (
        "hidden_size: 102 is not divisible by num_attention_heads=4; "
        "num_kv_attention_heads: 3 does not divide num_attention_heads=4"
    )
    with pytest.raises(TypeError, match="unknown InternLMConfig fields: layer_norm_epsilon"):
        InternLMConfig.unchecked(layer_norm_epsilon=1e-5)


def test_model_problem_reported_under_its_config_key(tmp_path, monkeypatch):
    # a model problem of a renamed field names the config key, not the InternLMConfig field
    def problems(self):
        return [Problem("norm_eps", "made up")] if self.norm_eps > 0.1 else []

    monkeypatch.setattr(InternLMConfig, "problems", problems)
    path = str(tmp_path / "run.py")
    with open(path, "w") as f:
        f.write(VALID + "model['layer_norm_epsilon'] = 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: model.layer_norm_epsilon: made up"
