"""Loading InternLM-format configs: defaults, _base_, --set, dump round trip, model config, docs."""

import os
import pickle
import re
import textwrap
import typing
from dataclasses import FrozenInstanceError, fields
from typing import Optional, Union

import pytest
import torch

from internlm.config import (
    CONFIG_KEY_OF_FIELD,
    Config,
    ConfigError,
    DataSection,
    ModelSection,
    ParallelSection,
    RunConfig,
    TensorSection,
    dump_config,
    load_config,
    load_run_config,
    model_config_from,
    parse_overrides,
    section_from,
    sections,
)
from internlm.config.docs import DOC_PATH, render_reference
from internlm.config.keys import Section, spec_of
from internlm.config.schema import ROOT, iter_fields
from internlm.model.config import InternLMConfig
from internlm.problems import Problem

MODEL, DATA = spec_of(ModelSection), spec_of(DataSection)  # the schema sections read from the classes

# an InternLM-style config in the shape of InternLM's configs/7B_sft.py (trimmed)
INTERNLM_STYLE = """
import os
JOB_NAME = "7b_train"
DO_ALERT = False
SEQ_LEN = 2048
HIDDEN_SIZE = 4096
CHECKPOINT_EVERY = 50
ckpt = dict(
    enable_save_ckpt=False,
    save_ckpt_folder="local:llm_ckpts",
    load_ckpt_info=dict(path="local:llm_ckpts/xxxx", content=("model",), ckpt_type="internlm"),
    checkpoint_every=CHECKPOINT_EVERY,
    # InternLM's async_upload=True, oss_snapshot_freq=25 and min_length=50 are rejected at start-up with what to
    # use instead (tests/e2e/test_internlm_compat.py); here their accepted equivalents
    async_upload=False,
    async_upload_tmp_folder="/dev/shm/internlm_tmp_ckpt/",
    oss_snapshot_freq=CHECKPOINT_EVERY,
)
data = dict(
    seq_len=SEQ_LEN, micro_num=4, micro_bsz=2, valid_micro_num=4, valid_every=50,
    pack_sample_into_one=False, total_steps=50000, skip_batches="", rampup_batch_size="",
    min_length=0, empty_cache_and_diag_interval=10, diag_outlier_ratio=1.1,
)
grad_scaler = dict(
    fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),
    growth_factor=2, backoff_factor=0.5, max_scale=2**24, hysteresis=2,
)
hybrid_zero_optimizer = dict(overlap_sync_grad=True, overlap_sync_param=True,
                             reduce_bucket_size=512 * 1024 * 1024, clip_grad_norm=1.0)
loss = dict(label_smoothing=0)
adam = dict(lr=1e-4, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.01)
lr_scheduler = dict(total_steps=data["total_steps"], init_steps=0, warmup_ratio=0.01, eta_min=1e-5,
                    last_epoch=-1)
beta2_scheduler = dict(init_beta2=adam["adam_beta2"], c=adam["adam_beta2_c"], cur_iter=-1)
model = dict(
    checkpoint=False, num_attention_heads=32, embed_split_hidden=True, vocab_size=103168,
    embed_grad_scale=1, parallel_output=True, hidden_size=HIDDEN_SIZE, num_layers=32, mlp_ratio=8 / 3,
    apply_post_layer_norm=False, dtype="torch.bfloat16", norm_type="rmsnorm", layer_norm_epsilon=1e-5,
    use_flash_attn=True, num_chunks=1,
)
parallel = dict(zero1=8, tensor=1, pipeline=dict(size=1, interleaved_overlap=True), sequence_parallel=False)
cudnn_deterministic = False
cudnn_benchmark = False
monitor = dict(alert=dict(enable_feishu_alert=DO_ALERT, feishu_alert_address=None))
"""

TINY = """
model = dict(preset="internlm-tiny")
data = dict(seq_len=32, micro_num=2, micro_bsz=2, total_steps=10)
"""


def write(folder, name, text):
    path = os.path.join(str(folder), name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return path


def test_internlm_style_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "7B_sft.py", INTERNLM_STYLE))
    assert isinstance(cfg, Config) and cfg.data.seq_len == cfg["data"]["seq_len"] == 2048
    assert cfg.JOB_NAME == "7b_train" and cfg.work_dir == "work_dirs/7b_train"
    assert cfg.SEQ_LEN == 2048 and cfg.DO_ALERT is False  # constants kept
    assert "os" not in cfg  # imported modules are helpers
    assert cfg.parallel.zero1 == {"size": 8, "fsdp": False}
    assert cfg.parallel.tensor == {"size": 1, "mode": "mtp", "sp": "none", "intern_overlap": False}
    assert cfg.parallel.pipeline == {"size": 1, "interleaved_overlap": True}
    assert cfg.ckpt.save_ckpt_folder == "llm_ckpts"  # "local:" dropped
    assert cfg.loss.label_smoothing == 0.0 and isinstance(cfg.loss.label_smoothing, float)
    # defaults filled, derived defaults resolved
    assert cfg.seed == 1024 and cfg.monitor.tensorboard is True and cfg.ckpt.keep_last == 3
    assert cfg.model.max_position_embeddings == 2048 and cfg.model.num_kv_attention_heads == 32
    assert cfg.phase == {"name": "7B_sft", "reset_optimizer": False, "reset_data": False}
    assert cfg.lr_scheduler.total_steps == 50000 and cfg.beta2_scheduler.init_beta2 == 0.95
    assert cfg.source_files == [str(tmp_path / "7B_sft.py")]
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_derived_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "t.py", TINY + "model['use_flash_attn'] = False\n"))
    assert cfg.work_dir == "work_dirs/internlm"
    assert cfg.ckpt.save_ckpt_folder == os.path.join("work_dirs/internlm", "checkpoints")
    assert cfg.model.attn_backend == "sdpa"
    assert cfg.model.max_position_embeddings == 32  # tiny preset has none: data.seq_len


def test_helpers_ignored_and_torch_dtype_accepted(tmp_path):
    text = "import torch\nfrom math import ceil\n_private = 1\ndef helper():\n    return 1\n" + TINY
    text += "model['dtype'] = torch.float16\ndata['total_steps'] = ceil(9.5)\n"
    cfg = load_config(write(tmp_path, "t.py", text))
    assert cfg.model.dtype == "torch.float16" and cfg.data.total_steps == 10
    assert not {"torch", "ceil", "_private", "helper"} & set(cfg)
    cfg.update(extra={"a": 1})
    assert cfg.extra.a == 1


def test_base_merge_delete_and_chain(tmp_path):
    write(tmp_path, "root.py", TINY + "adam = dict(lr=3e-4, weight_decay=0.1)\nSHARED = 1\n")
    os.mkdir(tmp_path / "sub")
    write(
        tmp_path / "sub",
        "mid.py",
        """
        _base_ = "../root.py"
        data = dict(micro_bsz=4)
        lr_scheduler = dict(warmup_ratio=0.1, eta_min=1e-6)
    """,
    )
    child = write(
        tmp_path / "sub",
        "child.py",
        """
        _base_ = ["mid.py"]
        data = dict(seq_len=64)
        adam = dict(_delete_=True, lr=2e-4)
    """,
    )
    cfg = load_config(child)
    assert (cfg.data.seq_len, cfg.data.micro_bsz, cfg.data.micro_num, cfg.data.total_steps) == (64, 4, 2, 10)
    assert cfg.adam.lr == 2e-4 and cfg.adam.weight_decay == 0.01  # replaced, not merged: default back
    assert cfg.lr_scheduler.warmup_ratio == 0.1 and cfg.SHARED == 1 and cfg.model.hidden_size == 64
    assert "_delete_" not in cfg.adam and "_base_" not in cfg
    assert cfg.source_files == [child, str(tmp_path / "sub" / "mid.py"), str(tmp_path / "root.py")]
    assert cfg.phase.name == "child"


def test_overrides(tmp_path):
    path = write(tmp_path, "t.py", TINY + "parallel = dict(tensor=1)\n")
    cfg = load_config(
        path,
        [
            "model.dtype=torch.float32",
            "adam.lr=3e-4",
            "JOB_NAME=run1",
            "model.num_layers=3",
            "parallel.tensor.size=2",
            "parallel.pipeline={'size': 2}",
            "monitor.log_every=5",
            "data.total_steps=None",
            "data.total_tokens=2e6",
            "model.checkpoint=0.5",
        ],
    )
    assert cfg.model.dtype == "torch.float32" and cfg.adam.lr == 3e-4 and cfg.JOB_NAME == "run1"
    assert cfg.work_dir == "work_dirs/run1" and cfg.model.num_layers == 3
    assert cfg.parallel.tensor == {"size": 2, "mode": "mtp", "sp": "none", "intern_overlap": False}
    assert cfg.parallel.pipeline == {"size": 2, "interleaved_overlap": False}
    assert cfg.monitor.log_every == 5 and cfg.data.total_steps is None and cfg.data.total_tokens == 2_000_000
    assert cfg.lr_scheduler.total_steps is None and cfg.model.checkpoint == 0.5


def test_dict_override_replaces(tmp_path):
    path = write(tmp_path, "t.py", TINY + "data['train_folder'] = {'a': 1, 'b': 3}\n")
    cfg = load_config(path, ["data.train_folder={'c': 2}"])
    assert cfg.data.train_folder == {"c": 2.0}


def test_parse_overrides():
    assert parse_overrides(["a.b=1", "c=x y", "d=[1, 2]", "e='q'", "f="]) == [
        ("a.b", 1),
        ("c", "x y"),
        ("d", [1, 2]),
        ("e", "q"),
        ("f", ""),
    ]
    with pytest.raises(ConfigError, match=r"^--set model\.num_layers: expected key\.path=value"):
        parse_overrides(["model.num_layers"])


def test_dump_round_trip(tmp_path):
    src = write(tmp_path, "7B_sft.py", INTERNLM_STYLE + "data['train_folder'] = {'x/a': 1, 'y': 2.5}\n")
    cfg = load_config(src, ["model.num_kv_attention_heads=8", "phase.reset_optimizer=True"])
    out = str(tmp_path / "dumped" / "resolved.py")
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert again.phase.name == "7B_sft"  # explicit in the dump, not the new file's stem

    tiny = load_config(write(tmp_path, "tiny.py", TINY))
    dump_config(tiny, str(tmp_path / "tiny_dump.py"))
    assert load_config(str(tmp_path / "tiny_dump.py")) == tiny


def test_dump_skips_non_literal_constant_but_not_keys(tmp_path):
    cfg = load_config(write(tmp_path, "t.py", TINY + "import pathlib\nROOT_DIR = pathlib.Path('/x')\n"))
    dump_config(cfg, str(tmp_path / "out.py"))
    again = load_config(str(tmp_path / "out.py"))
    assert "ROOT_DIR" not in again and again == {k: v for k, v in cfg.items() if k != "ROOT_DIR"}
    cfg.data.valid_folder = object()
    with pytest.raises(ConfigError, match=r"^data\.valid_folder: .* not a Python literal"):
        dump_config(cfg, str(tmp_path / "out2.py"))


def test_config_error_has_one_signature():
    err = ConfigError("parallel", "differs from b.py", "a.py")
    assert str(err) == "a.py: parallel: differs from b.py"
    assert (err.key, err.problem, err.file) == ("parallel", "differs from b.py", "a.py")
    assert pickle.loads(pickle.dumps(err)).args == err.args
    with pytest.raises(TypeError):
        ConfigError("a.py: parallel: differs from b.py")  # no pre-formatted single-argument form
    err = ConfigError.from_problem(Problem("parallel.zero1", "size 3 does not divide 4"), "a.py")
    assert str(err) == "a.py: parallel.zero1: size 3 does not divide 4" and err.file == "a.py"


def test_model_config_from_preset(tmp_path):
    cfg = load_config(
        write(tmp_path, "t.py", TINY), ["model.num_layers=3", "model.layer_norm_epsilon=1e-5", "model.dtype=bf16"]
    )
    mc = model_config_from(cfg)
    assert (mc.hidden_size, mc.num_attention_heads, mc.vocab_size, mc.multiple_of) == (64, 4, 256, 16)
    assert mc.num_layers == 3 and mc.norm_eps == 1e-5 and mc.dtype == torch.bfloat16
    assert mc.max_position_embeddings == 32 and mc.attn_backend == "auto"
    assert cfg.model.dtype == "torch.bfloat16"

    big = load_config(write(tmp_path, "big.py", "model = dict(preset='internlm-20b')\ndata = dict(total_steps=1)\n"))
    assert big.model.hidden_size == 5120 and big.model.max_position_embeddings == 4096
    assert model_config_from(big).num_params() > 19e9


def test_every_schema_key_documented():
    with open(DOC_PATH, encoding="utf-8") as f:
        text = f.read()
    for path, _ in iter_fields():
        assert re.search(rf"`{re.escape(path)}`", text), f"docs/config.md lacks key {path}"
    assert render_reference() in text, "docs/config.md is stale: run python -m internlm.config.docs"


def test_model_config_from_is_a_plain_mapping(tmp_path):
    cfg = load_config(write(tmp_path, "t.py", TINY), ["model.use_flash_attn=False"])
    mc = model_config_from(cfg)
    assert mc.attn_backend == "sdpa" == cfg.model.attn_backend  # resolved by load_config, not here
    for field in fields(InternLMConfig):
        key = CONFIG_KEY_OF_FIELD.get(field.name, field.name)
        assert key in MODEL.fields, f"InternLMConfig.{field.name} has no config key"
        expected = cfg.model[key] if field.name != "dtype" else torch.bfloat16
        assert getattr(mc, field.name) == expected, field.name
    del cfg.model["max_position_embeddings"]
    with pytest.raises(KeyError):  # no fallback of its own: the config must be resolved
        model_config_from(cfg)


def test_model_keys_take_the_model_defaults():
    # one default per key: a model-section key that is an InternLMConfig field has that field's default, but for
    # the two the config resolves differently (training precision bf16; max_position_embeddings from data.seq_len)
    for field in fields(InternLMConfig):
        spec = MODEL.fields[CONFIG_KEY_OF_FIELD.get(field.name, field.name)]
        if field.name == "dtype":
            assert (spec.default, field.default) == ("torch.bfloat16", torch.float32)
        elif field.name == "max_position_embeddings":
            assert spec.default is None
        else:
            assert spec.default == field.default, field.name


def test_preset_fills_renamed_keys(tmp_path):
    cfg = load_config(write(tmp_path, "t.py", TINY))
    assert cfg.model.layer_norm_epsilon == 1e-6 and "norm_eps" not in cfg.model


def test_section_classes_follow_the_schema():
    expected = {
        "model": "ModelSection",
        "data": "DataSection",
        "parallel": "ParallelSection",
        "parallel.tensor": "TensorSection",
        "parallel.pipeline": "PipelineSection",
        "parallel.zero1": "Zero1Section",
        "adam": "AdamSection",
        "lr_scheduler": "LRSchedulerSection",
        "beta2_scheduler": "Beta2SchedulerSection",
        "hybrid_zero_optimizer": "HybridZeroOptimizerSection",
        "grad_scaler": "GradScalerSection",
        "grad_scaler.fp16": "Fp16Section",
        "loss": "LossSection",
        "ckpt": "CkptSection",
        "monitor": "MonitorSection",
        "profile": "ProfileSection",
        "phase": "PhaseSection",
        "health": "HealthSection",
        "evaluation": "EvaluationSection",
    }
    for path, spec in iter_fields():
        if isinstance(spec, Section):
            cls = getattr(sections, expected[path])
            assert cls.__name__ == expected[path] and cls.__doc__ == spec.doc
            assert [f.name for f in fields(cls)] == list(spec.fields)
    hints = typing.get_type_hints(ModelSection)
    assert hints["num_kv_attention_heads"] == Optional[int] and hints["hidden_size"] is int
    assert hints["checkpoint"] == Union[bool, float, str]
    assert typing.get_type_hints(ParallelSection)["tensor"] is TensorSection
    root = [f.name for f in fields(RunConfig)]
    assert root == list(ROOT.fields) + ["raw", "file", "model_config"]


def test_section_from_needs_a_resolved_section(tmp_path):
    cfg = load_config(write(tmp_path, "t.py", TINY))
    data = section_from(DataSection, cfg.data)
    assert data.seq_len == 32 and section_from(DATA, cfg.data) == data  # the class or its schema section
    partial = dict(cfg.data)
    del partial["micro_bsz"]
    with pytest.raises(ConfigError, match=r"^data\.micro_bsz: missing"):
        section_from(DataSection, partial)
    with pytest.raises(ConfigError, match=r"^data\.extra: not a key"):
        section_from(DataSection, dict(cfg.data, extra=1))


def test_run_config(tmp_path):
    path = write(tmp_path, "t.py", TINY + "parallel = dict(tensor=2, zero1=2, sequence_parallel=True)\nSTEPS = 3\n")
    run = load_run_config(path, ["data.train_folder={'a': 1}"])
    cfg = load_config(path, ["data.train_folder={'a': 1}"])
    assert isinstance(run, RunConfig) and run.raw == cfg and run.file == path
    assert run == RunConfig.from_config(cfg, path)
    assert run.data.seq_len == 32 and run.data.micro_bsz == 2 and run.parallel.tensor.size == 2
    assert run.parallel.pipeline.size == 1 and run.parallel.zero1.size == 2 and run.JOB_NAME == "internlm"
    assert isinstance(run.model, ModelSection) and run.model.layer_norm_epsilon == 1e-6
    assert run.phase.name == "t" and run.grad_scaler.fp16.initial_scale == 2.0**16
    assert type(run.data.train_folder) is dict and run.data.train_folder == {"a": 1.0}  # plain, not shared
    assert run.raw.STEPS == 3 and not hasattr(run, "STEPS")  # constants stay in raw
    assert run.model_config == model_config_from(cfg)
    with pytest.raises(FrozenInstanceError):
        run.data = None
    with pytest.raises(FrozenInstanceError):
        run.parallel.tensor.size = 4
    assert pickle.loads(pickle.dumps(run)) == run
    assert "raw=" not in repr(run)


def test_run_config_layout(tmp_path):
    from internlm.parallel.layout import Layout

    path = write(tmp_path, "t.py", TINY + "parallel = dict(tensor=2, pipeline=2, sequence_parallel=True)\n")
    run = load_run_config(path, ["model.num_chunks=2"])
    assert run.layout(8) == Layout.create(8, tensor=2, pipeline=2, zero1=-1, num_chunks=2, sequence_parallel=True)
    assert run.layout(8).data == 2 and run.layout(8).zero1 == 2
    tp2 = load_run_config(write(tmp_path, "u.py", TINY + "parallel = dict(tensor=2)\n"))
    assert tp2.layout(8) == Layout.create(8, tensor=2)
