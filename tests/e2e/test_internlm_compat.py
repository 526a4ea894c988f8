"""InternLM compatibility: a config in InternLM's format carrying every key of its 7B config (configs/7B_sft.py)
trains through train.py (fp16 included); every rejected value fails at start-up with one line naming what to
use instead (exit 2, no traceback); InternLM's tokenized data is detected and converted in one command."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from internlm.train.cli import main
from train_utils import REPO, read_metrics, run_train, step_losses, write_base

# InternLM's configs/7B_sft.py with small sizes and local folders; every key of it is here. Values that are
# rejected (async_upload=True, min_length=50, zero1=8 on one process) are set to their accepted equivalents.
CONFIG = """
JOB_NAME = "7b_train"
DO_ALERT = False

SEQ_LEN = 32
HIDDEN_SIZE = 64
NUM_ATTENTION_HEAD = 4
MLP_RATIO = 8 / 3
NUM_LAYER = 2
VOCAB_SIZE = 512

MODEL_ONLY_FOLDER = "local:{root}/llm_ckpts/xxxx"
SAVE_CKPT_FOLDER = "local:{root}/llm_ckpts"
LOAD_CKPT_FOLDER = "local:{root}/llm_ckpts/49"
CHECKPOINT_EVERY = 2
ckpt = dict(
    enable_save_ckpt=False,
    save_ckpt_folder=SAVE_CKPT_FOLDER,
    load_ckpt_folder="local:{root}/llm_ckpts/",
    load_ckpt_info=dict(path=MODEL_ONLY_FOLDER, content=("model",), ckpt_type="internlm"),
    checkpoint_every=CHECKPOINT_EVERY,
    async_upload=False,
    async_upload_tmp_folder="/dev/shm/internlm_tmp_ckpt/",
    oss_snapshot_freq=int(CHECKPOINT_EVERY / 2),
)

TRAIN_FOLDER = "{data}"
VALID_FOLDER = "{data}"
data = dict(
    seq_len=SEQ_LEN,
    micro_num=4,
    micro_bsz=2,
    valid_micro_num=4,
    valid_every=50,
    pack_sample_into_one=False,
    total_steps=3,
    skip_batches="",
    rampup_batch_size="",
    min_length=0,
    train_folder=TRAIN_FOLDER,
    valid_folder=VALID_FOLDER,
    empty_cache_and_diag_interval=10,
    diag_outlier_ratio=1.1,
)

grad_scaler = dict(
    fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),
    growth_factor=2,
    backoff_factor=0.5,
    max_scale=2**24,
    hysteresis=2,
)

hybrid_zero_optimizer = dict(
    overlap_sync_grad=True, overlap_sync_param=True, reduce_bucket_size=512 * 1024 * 1024, clip_grad_norm=1.0
)

loss = dict(label_smoothing=0)

adam = dict(lr=1e-4, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.01)

lr_scheduler = dict(total_steps=data["total_steps"], init_steps=0, warmup_ratio=0.01, eta_min=1e-5, last_epoch=-1)

beta2_scheduler = dict(init_beta2=adam["adam_beta2"], c=adam["adam_beta2_c"], cur_iter=-1)

model = dict(
    checkpoint=False,
    num_attention_heads=NUM_ATTENTION_HEAD,
    embed_split_hidden=True,
    vocab_size=VOCAB_SIZE,
    embed_grad_scale=1,
    parallel_output=True,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    mlp_ratio=MLP_RATIO,
    apply_post_layer_norm=False,
    dtype="torch.float16",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    use_flash_attn=True,
    num_chunks=1,
)
parallel = dict(
    zero1=-1,
    tensor=1,
    pipeline=dict(size=1, interleaved_overlap=True),
    sequence_parallel=False,
)

cudnn_deterministic = False
cudnn_benchmark = False

monitor = dict(
    alert=dict(
        enable_feishu_alert=DO_ALERT,
        feishu_alert_address=None,
        light_monitor_address=None,
    ),
)
"""


def write_internlm_data(folder, files=2, docs=60, seed=0):
    """Files in InternLM's tools/tokenizer.py format: JSON lines {"tokens": [...]} and a numpy (offset, length)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for k in range(files):
        path = os.path.join(folder, f"part{k}.bin")
        meta, cursor = [], 0
        with open(path, "wb") as f:
            for _ in range(docs):
                tokens = [1] + rng.integers(3, 512, int(rng.integers(4, 80))).tolist()
                line = (json.dumps({"tokens": tokens}) + "\n").encode()
                f.write(line)
                meta.append((cursor, len(tokens)))
                cursor += len(line)
        with open(path + ".meta", "wb") as f:
            np.save(f, np.array(meta, dtype=np.int32))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """InternLM-format data in nested folders, converted with the one documented command."""
    root = tmp_path_factory.mktemp("internlm_data")
    write_internlm_data(str(root / "train" / "cn"), seed=0)
    write_internlm_data(str(root / "train" / "en"), seed=1)
    out = str(root / "converted")
    cmd = [sys.executable, os.path.join(REPO, "tools", "convert_internlm_data.py"), str(root / "train"), out]
    proc = subprocess.run(cmd + ["--vocab-size", "512"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "converted 4 file(s): 240 documents" in proc.stdout, proc.stdout
    return root, out


def _config(tmp_path, data, replace=()):
    text = CONFIG.format(root=tmp_path, data=data)
    for old, new in replace:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "internlm_7b.py"
    path.write_text(text)
    return str(path)


def test_converted_documents_are_token_for_token(converted):
    from internlm.data.internlm_format import read_documents
    from internlm.data.shard import Shard

    root, out = converted
    shard = Shard(os.path.join(out, "cn__part1.bin"))
    original = list(read_documents(str(root / "train" / "cn" / "part1.bin")))
    assert shard.num_docs == len(original) == 60
    for index in (0, 17, 59):
        assert shard.document(index).tolist() == original[index]


def test_min_length_drops_short_documents(converted, tmp_path):
    from internlm.data.internlm_format import convert_internlm_folder, read_documents

    root, _ = converted
    stats = convert_internlm_folder(str(root / "train" / "en"), str(tmp_path / "out"), vocab_size=512, min_length=40)
    lengths = [len(t) for k in range(2) for t in read_documents(str(root / "train" / "en" / f"part{k}.bin"))]
    assert stats["documents"] == sum(n >= 40 for n in lengths) and stats["dropped"] == sum(n < 40 for n in lengths)
    assert stats["tokens"] == sum(n for n in lengths if n >= 40)


def test_internlm_7b_config_trains_fp16(converted, tmp_path):
    """Every key of InternLM's 7B config, through train.py: trains in fp16 with the grad_scaler section, and says
    that load_ckpt_info is not used because auto_resume (InternLM's default) takes precedence."""
    _, data = converted
    work_dir = str(tmp_path / "run")
    # InternLM's growth_interval=1000 cannot change the scale in 3 steps: with its own keys set to 2**10 and 1, the
    # scale the run logs shows both were read (it doubles after every clean step, from 2**10)
    scaler = [("initial_scale=2**16", "initial_scale=2**10"), ("growth_interval=1000", "growth_interval=1")]
    proc = run_train([_config(tmp_path, data, scaler)], sets=[f"work_dir={work_dir}"])
    assert "float16" in proc.stdout
    assert "ckpt.load_ckpt_info" in proc.stdout and "ckpt.auto_resume=True takes precedence" in proc.stdout
    steps = [r for r in read_metrics(work_dir) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["overflow_steps"] == 0 for r in steps)
    assert [r["loss_scale"] for r in steps] == [2.0**11, 2.0**12, 2.0**13]


def test_internlm_data_folder_names_the_conversion(converted, tmp_path, capsys):
    root, _ = converted
    config = _config(tmp_path, str(root / "train" / "cn"))
    assert main(["--config", config, "--set", f"work_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "InternLM's tokenized format" in err and "python tools/convert_internlm_data.py" in err


REJECTED = {
    "async_upload": (
        ("async_upload=False", "async_upload=True"),
        "ckpt.async_upload: True is not supported",
        "ckpt.async_save=True",
    ),
    "alert_scheme": (  # an address is a webhook (docs/troubleshooting.md): http(s) only
        (
            "enable_feishu_alert=DO_ALERT,\n        feishu_alert_address=None",
            "enable_feishu_alert=True,\n        feishu_alert_address='ftp://open.feishu.cn/hook/x'",
        ),
        "monitor.alert: feishu_alert_address='ftp://open.feishu.cn/hook/x'",
        "only http:// and https:// webhooks are supported",
    ),
    "pack_sample_into_one": (
        ("pack_sample_into_one=False", "pack_sample_into_one=True"),
        "data.pack_sample_into_one: True is not supported",
        "set False",
    ),
    "rampup_batch_size": (
        ('rampup_batch_size=""', 'rampup_batch_size="16 16 1000"'),
        "data.rampup_batch_size:",
        "one phase config per batch size",
    ),
    "min_length": (
        ("min_length=0", "min_length=50"),
        "data.min_length: 50:",
        "python tools/convert_internlm_data.py SRC DST --min-length 50",
    ),
    "oss_snapshot_freq": (
        ("oss_snapshot_freq=int(CHECKPOINT_EVERY / 2)", "oss_snapshot_freq=3"),
        "ckpt.oss_snapshot_freq: 3: snapshot checkpoints are not supported",
        "ckpt.checkpoint_every=3",
    ),
    "load_ckpt_info_type": (
        ('ckpt_type="internlm"', 'ckpt_type="llama"'),
        "ckpt.load_ckpt_info: ckpt_type 'llama' is not supported",
        "'internlm' (our checkpoints) or 'hf'",
    ),
    "data_type": (
        ("    diag_outlier_ratio=1.1,\n", '    diag_outlier_ratio=1.1,\n    type="mocked",\n'),
        "data.type: 'mocked' is not supported",
        "tools/convert_internlm_data.py",
    ),
    "tensor_sp": (  # InternLM's configs/7B_train/*.py: tensor=dict(size=8, sp="flash", intern_overlap=False)
        ("    tensor=1,\n", '    tensor=dict(size=1, sp="flash", intern_overlap=False),\n'),
        "parallel.tensor.sp: 'flash' is not supported",
        "use 'megatron' (or parallel.sequence_parallel=True",
    ),
    "embed_split_hidden": (
        ("embed_split_hidden=True", "embed_split_hidden=False"),
        "model.embed_split_hidden: False is not supported",
        "only True",
    ),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_rejected_value_is_one_line_at_start_up(case, tmp_path, capsys):
    """A value that would do nothing here fails before anything starts: exit 2, one line naming the key and
    what to use instead, no traceback."""
    replace, problem, instead = REJECTED[case]
    config = _config(tmp_path, str(tmp_path / "data"), [replace])
    assert main(["--config", config, "--set", f"work_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert problem in err and instead in err, err


# ---------------------------------------------------------------------- ckpt.load_ckpt_info
def _info_run(tmp_path, demo_data, name, ckpt_sets):
    work_dir = str(tmp_path / name)
    config = write_base(str(tmp_path / f"cfg_{name}"), demo_data, work_dir)
    proc = run_train([config], sets=["data.total_steps=4", "ckpt.checkpoint_every=2", *ckpt_sets])
    return proc, step_losses(work_dir)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, demo_data):
    root = tmp_path_factory.mktemp("info_source")
    _, losses = _info_run(root, demo_data, "source", [])
    return str(root / "source" / "checkpoints" / "2"), losses


def _info(path, content, ckpt_type="internlm", auto_resume=False):
    return [
        f"ckpt.auto_resume={auto_resume}",
        f"ckpt.load_ckpt_info={dict(path=path, content=content, ckpt_type=ckpt_type)!r}",
    ]


def test_load_ckpt_info_all_continues_the_source_run(source_run, tmp_path, demo_data):
    """content ('all',) from checkpoint 2 of another run: steps 3 and 4 repeat that run's exactly."""
    path, source = source_run
    proc, losses = _info_run(tmp_path, demo_data, "all", _info(path, ("all",)))
    assert "starting from ckpt.load_ckpt_info" in proc.stdout and f"resumed from {path}" in proc.stdout
    assert losses == {3: source[3], 4: source[4]}


def test_load_ckpt_info_without_scheduler(source_run, tmp_path, demo_data):
    """('model', 'optimizer', 'sampler'): the weights, optimizer state and data position of checkpoint 2, the
    schedules from step 1; the first loss is taken before any update, so it equals the source run's step-3 loss,
    and the optimizer's update count continues from the checkpoint's."""
    path, source = source_run
    content = ("model", "optimizer", "sampler")
    proc, losses = _info_run(tmp_path, demo_data, "no_scheduler", _info(path, content))
    assert f"initial model weights from {path}" in proc.stdout
    assert sorted(losses) == [1, 2, 3, 4] and losses[1] == source[3]
    shard = torch.load(tmp_path / "no_scheduler" / "checkpoints" / "4" / "optim_tp0_pp0_dp0.pt", weights_only=False)
    assert shard["num_updates"] == 2 + 4


def test_auto_resume_takes_precedence_over_load_ckpt_info():
    """InternLM's rule (its CheckpointManager: auto-resume overwrites load_ckpt_info): with auto_resume=True the
    info is not used even when there is nothing to resume, and it takes precedence over load_ckpt_folder."""
    from types import SimpleNamespace

    from internlm.train.initial_load import plan_start

    info = dict(path="/ckpts/given", content=("model", "optimizer"), ckpt_type="internlm")
    ckpt = SimpleNamespace(auto_resume=True, load_ckpt_info=info, load_ckpt_folder="/ckpts/folder")
    resumed = plan_start(ckpt, "/run/checkpoints/8")
    assert resumed.resume_path == resumed.optimizer_from == resumed.sampler_from == "/run/checkpoints/8"
    assert "is not used: ckpt.auto_resume=True takes precedence" in resumed.messages[0]
    fresh = plan_start(ckpt, None)
    assert fresh.resume_path is fresh.weights_from is fresh.optimizer_from is None
    assert "starts from scratch" in fresh.messages[0]
    given = plan_start(SimpleNamespace(auto_resume=False, load_ckpt_info=info, load_ckpt_folder="/ckpts/folder"), None)
    assert (given.resume_path, given.weights_from, given.optimizer_from, given.sampler_from) == (
        None,
        "/ckpts/given",
        "/ckpts/given",
        None,
    )
    assert "ckpt.load_ckpt_folder (/ckpts/folder) is not used" in given.messages[0]
    folder = plan_start(SimpleNamespace(auto_resume=True, load_ckpt_info=None, load_ckpt_folder="/ckpts/folder"), None)
    assert folder.weights_from == "/ckpts/folder" and folder.optimizer_from is None


@pytest.mark.slow
def test_load_ckpt_info_hf_folder_equals_our_checkpoint(source_run, tmp_path, demo_data):
    """ckpt_type='hf': the checkpoint exported to a Hugging Face folder starts a run exactly as the checkpoint
    itself does (content ('model',)), here under tensor parallelism 2 (the full tensors are cut into shards)."""
    path, _ = source_run
    hf_dir = str(tmp_path / "hf")
    cmd = [sys.executable, os.path.join(REPO, "tools", "convert_to_hf.py"), "--checkpoint", path, "--output", hf_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours_proc, ours = _info_run(tmp_path, demo_data, "ours", _info(path, ("model",)))
    work_dir = str(tmp_path / "hf_tp2")
    config = write_base(str(tmp_path / "cfg_hf_tp2"), demo_data, work_dir)
    sets = ["data.total_steps=4", "ckpt.checkpoint_every=2", "parallel.tensor=2", *_info(hf_dir, ("model",), "hf")]
    run_train([config], nproc=2, sets=sets)
    theirs = step_losses(work_dir)
    assert sorted(theirs) == sorted(ours)
    for step in ours:
        assert abs(theirs[step] - ours[step]) <= 1e-4 * ours[step], (step, theirs[step], ours[step])


def test_load_ckpt_info_missing_path_is_one_line(tmp_path, demo_data, capsys):
    config = write_base(str(tmp_path / "cfg"), demo_data, str(tmp_path / "run"))
    sets = _info(str(tmp_path / "nowhere"), ("model",))
    assert main(["--config", config, "--set", *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ckpt.load_ckpt_info: path" in err and "is not a folder" in err


def test_load_ckpt_info_hf_folder_of_another_model_is_one_line(tmp_path, demo_data, capsys):
    from internlm.model import InternLMConfig
    from internlm.model.hf import write_hf_config

    hf_dir = str(tmp_path / "hf")
    write_hf_config(hf_dir, InternLMConfig(hidden_size=32, num_layers=4, num_attention_heads=4, vocab_size=2048))
    config = write_base(str(tmp_path / "cfg"), demo_data, str(tmp_path / "run"))
    assert main(["--config", config, "--set", *_info(hf_dir, ("model",), "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds another model: hidden_size 32 (model.hidden_size 64)" in err, err
