"""Hugging Face export / import (tools/convert_to_hf.py, tools/convert_from_hf.py, internlm/model/hf.py).

End to end on a checkpoint that train.py saved under tensor 2 x pipeline 2 (4 gloo processes, 2 steps): the
exported folder loads in ``transformers`` (LlamaForCausalLM, no remote code) with logits within 1e-4 of ours in
fp32, its tokenizer encodes like ours, and ours -> HF -> ours is bit-exact. Unit level: the config mapping of
Llama and InternLM's published configs, size parsing and shard planning.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from internlm.checkpoint import merge_model_checkpoint, model_file, read_meta
from internlm.model import InternLM, InternLMConfig
from internlm.model.hf import config_values_from_hf, parse_size, plan_shards
from internlm.model.pretrained import load_config
from train_utils import REPO, run_train, step_losses, write_base

sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_from_hf  # noqa: E402
import convert_to_hf  # noqa: E402

PP2_TP2 = ["parallel.tensor=2", "parallel.pipeline.size=2", "data.micro_num=4"]
SAMPLE = "def greet(name):\n    return f'Hello, {name}!'  # 42 ünïcödé 中文\n\nThe quick brown fox.\n"


_CACHE: dict = {}  # one training run and one export per test session, shared with tests/checkpoint/test_pretrained.py


@pytest.fixture(scope="session")
def tp2pp2_run(tmp_path_factory, demo_data):
    """work_dir of a 2-step train.py run under tp2 x pp2, checkpoints at steps 1 and 2."""
    if "run" not in _CACHE:
        root = tmp_path_factory.mktemp("tp2pp2")
        work_dir = str(root / "run")
        cfg = write_base(str(root / "cfg"), demo_data, work_dir)
        run_train([cfg], nproc=4, sets=PP2_TP2 + ["data.total_steps=2", "ckpt.checkpoint_every=1"])
        assert read_meta(os.path.join(work_dir, "checkpoints", "2"))["layout"]["tensor"] == 2
        _CACHE["run"] = work_dir
    return _CACHE["run"]


@pytest.fixture(scope="session")
def exported(tp2pp2_run, tmp_path_factory):
    """The tp2 x pp2 checkpoint exported (tokenizer found through the run's config), in several shards."""
    if "hf" not in _CACHE:
        out = str(tmp_path_factory.mktemp("hf") / "hf")
        convert_to_hf.main(["--checkpoint", tp2pp2_run, "--output", out, "--max-shard-size", "400KB"])
        _CACHE["hf"] = out
    return _CACHE["hf"]


def test_export_loads_in_transformers_with_equal_logits(tp2pp2_run, exported):
    from transformers import AutoModelForCausalLM

    with open(os.path.join(exported, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors", shards
    with open(os.path.join(exported, "config.json")) as f:
        hf_config = json.load(f)
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in hf_config
    saved = load_config(os.path.join(tp2pp2_run, "checkpoints", "2"))
    assert hf_config["num_key_value_heads"] == saved.num_kv_attention_heads == 2 and hf_config["attention_bias"] is True
    assert hf_config["intermediate_size"] == saved.intermediate_size and hf_config["torch_dtype"] == "float32"

    theirs = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert theirs.model.layers[0].self_attn.o_proj.bias is not None  # attention_bias covers o_proj
    ours = InternLM.from_pretrained(tp2pp2_run)
    ids = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (theirs(ids).logits - ours(ids)).abs().max().item()
    print(f"max |logits(transformers) - logits(ours)| = {diff:.3e}")
    assert diff < 1e-4, diff
    # the trained weights are not the initial ones: the comparison is not between two fresh models
    assert not torch.equal(ours.lm_head.weight, InternLM(ours.config).lm_head.weight)


def test_exported_tokenizer_encodes_like_ours(exported, demo_data):
    from transformers import AutoTokenizer

    from internlm.data import Tokenizer

    theirs = AutoTokenizer.from_pretrained(exported)
    ours = Tokenizer(demo_data["tokenizer"])
    assert type(theirs).__name__ in ("LlamaTokenizer", "LlamaTokenizerFast")
    assert theirs(SAMPLE)["input_ids"] == ours.encode(SAMPLE)
    assert theirs.eos_token_id == ours.eos_id and theirs.decode(ours.encode(SAMPLE)) == SAMPLE


def test_round_trip_is_bit_exact(tp2pp2_run, exported, tmp_path):
    step2 = os.path.join(tp2pp2_run, "checkpoints", "2")
    original = merge_model_checkpoint(step2)
    back = str(tmp_path / "back")
    convert_from_hf.main(["--hf", exported, "--output", back])
    meta = read_meta(back)
    assert meta["version"] == 2 and meta["layout"]["world_size"] == 1
    assert set(meta["files"]) == {model_file(0, 0)} and len(meta["files"][model_file(0, 0)]["crc32"]) == 8
    assert InternLMConfig.from_dict(meta["model_config"]).to_hf() == load_config(step2).to_hf()
    again = merge_model_checkpoint(back)
    assert list(again) == list(original)
    for name, tensor in original.items():
        assert again[name].dtype == tensor.dtype and torch.equal(again[name], tensor), name


def test_training_starts_from_the_imported_checkpoint(tp2pp2_run, exported, demo_data, tmp_path):
    """train.py with ckpt.load_ckpt_folder = the imported folder computes the very first loss that it computes from
    the original tp2 x pp2 checkpoint (same weights, same batch)."""
    back = str(tmp_path / "back")
    convert_from_hf.main(["--hf", exported, "--output", back])
    losses = []
    for name, folder in (("imported", back), ("original", os.path.join(tp2pp2_run, "checkpoints", "2"))):
        work_dir = str(tmp_path / name)
        cfg = write_base(str(tmp_path / f"cfg_{name}"), demo_data, work_dir)
        out = run_train([cfg], sets=[f"ckpt.load_ckpt_folder={folder}", "data.total_steps=1"])
        assert f"initial model weights from {folder}" in out.stdout
        losses.append(step_losses(work_dir)[1])
    assert losses[0] == losses[1], losses


def test_bf16_export_and_merge_by_tp_records(tp2pp2_run, tmp_path):
    from safetensors.torch import load_file

    step1 = os.path.join(tp2pp2_run, "checkpoints", "1")
    out = str(tmp_path / "bf16")
    convert_to_hf.main(["--checkpoint", tp2pp2_run, "--step", "1", "--output", out, "--dtype", "bf16"])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    weights = load_file(os.path.join(out, "model.safetensors"))
    merged = merge_model_checkpoint(step1)
    for name, tensor in merged.items():
        hf_name = name if name.startswith("lm_head") else f"model.{name}"
        assert weights[hf_name].dtype == torch.bfloat16 and torch.equal(weights[hf_name], tensor.bfloat16()), name
    # a column-split weight is its tensor ranks' pieces in order (the saved TPShard records)
    q = "layers.0.self_attn.q_proj.weight"
    pieces = [torch.load(os.path.join(step1, model_file(t, 0)), weights_only=False)["chunks"][0][q] for t in (0, 1)]
    assert torch.equal(merged[q], torch.cat(pieces, 0))


INTERNLM_7B = {
    "architectures": ["InternLMForCausalLM"],
    "auto_map": {"AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"},
    "bias": True,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "max_position_embeddings": 2048,
    "model_type": "internlm",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "rms_norm_eps": 1e-06,
    "rotary": {"base": 10000, "type": "dynamic"},
    "torch_dtype": "bfloat16",
    "vocab_size": 103168,
}


def test_config_mapping_of_published_and_llama_configs():
    assert InternLMConfig.from_hf(INTERNLM_7B) == InternLMConfig.preset("internlm-7b", dtype=torch.bfloat16)
    twenty = dict(INTERNLM_7B, bias=False, hidden_size=5120, intermediate_size=13824, num_attention_heads=40)
    twenty.update(num_hidden_layers=60, max_position_embeddings=4096)
    assert InternLMConfig.from_hf(twenty) == InternLMConfig.preset("internlm-20b", dtype=torch.bfloat16)
    origin = InternLMConfig.from_hf(dict(INTERNLM_7B, rotary={"base": 50000, "type": "origin"}))
    assert origin.rope_scaling is None and origin.rope_base == 50000
    # ours -> Llama -> ours keeps every shape and numeric field
    config = InternLMConfig(
        vocab_size=1000, hidden_size=96, num_layers=3, num_attention_heads=6, num_kv_attention_heads=2,
        intermediate_size=200, rope_base=5e5, norm_eps=1e-5, qkvo_bias=False, max_position_embeddings=128,
        rope_scaling={"type": "linear", "factor": 4.0}, dtype=torch.bfloat16,
    )  # fmt: skip
    hf = config.to_hf()
    assert hf["rope_scaling"]["factor"] == 4.0 and hf["head_dim"] == 16 and hf["attention_bias"] is False
    assert InternLMConfig.from_hf(hf, multiple_of=config.multiple_of, init_std=config.init_std) == config
    # a transformers >= 5 style rope_parameters dict reads the same
    v5 = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}
    assert config_values_from_hf(v5)["rope_scaling"] == {"type": "linear", "factor": 4.0}
    for bad, key in ((dict(hf, mlp_bias=True), "mlp_bias"), (dict(hf, hidden_act="gelu"), "hidden_act")):
        with pytest.raises(ValueError, match=key):
            InternLMConfig.from_hf(bad)
    with pytest.raises(ValueError, match="rope_scaling"):
        InternLMConfig.from_hf(dict(hf, rope_scaling={"type": "yarn", "factor": 2.0}))


def test_import_of_internlm_published_layout(tmp_path):
    """An InternLM-style folder (config with ``bias`` / ``rotary``, sharded ``pytorch_model-*.bin`` with an index
    and ``rotary_emb.inv_freq`` buffers) imports to a checkpoint and loads with the very same tensors."""
    config = InternLMConfig.preset("internlm-tiny", rope_scaling={"type": "dynamic", "factor": 1.0})
    model = InternLM(config)
    hf_dir = tmp_path / "internlm_hf"
    os.makedirs(hf_dir)
    published = dict(INTERNLM_7B, hidden_size=64, intermediate_size=config.intermediate_size, num_attention_heads=4)
    published.update(num_hidden_layers=2, vocab_size=256, torch_dtype="float32")
    with open(hf_dir / "config.json", "w") as f:
        json.dump(published, f)
    state = {(n if n.startswith("lm_head") else f"model.{n}"): t for n, t in model.state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: state[n] for n in part}, hf_dir / file)
        weight_map.update({n: file for n in part})
    with open(hf_dir / "pytorch_model.bin.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)

    back = str(tmp_path / "ckpt")
    convert_from_hf.main(["--hf", str(hf_dir), "--output", back])
    for loaded in (InternLM.from_pretrained(back), InternLM.from_pretrained(str(hf_dir))):
        assert loaded.config.to_hf() == config.to_hf()
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
    with pytest.raises(SystemExit, match="exists and is not a checkpoint"):
        convert_from_hf.main(["--hf", str(hf_dir), "--output", str(hf_dir)])


def test_exported_rope_scaling_is_what_transformers_reads(tmp_path):
    from transformers import AutoConfig

    config = InternLMConfig.preset("internlm-tiny", rope_scaling={"type": "dynamic", "factor": 2.0})
    os.makedirs(tmp_path / "cfg")
    with open(tmp_path / "cfg" / "config.json", "w") as f:
        json.dump(config.to_hf(), f)
    theirs = AutoConfig.from_pretrained(str(tmp_path / "cfg"))
    rope = getattr(theirs, "rope_parameters", None) or theirs.rope_scaling
    assert rope["rope_type"] == "dynamic" and rope["factor"] == 2.0
    assert theirs.rms_norm_eps == config.norm_eps and theirs.num_key_value_heads == config.num_kv_attention_heads


def test_export_holds_one_file_at_a_time(tmp_path, monkeypatch):
    """`write_hf_weights` fetches a file's tensors only while writing it, and frees them before the next file."""
    import weakref

    import safetensors.torch

    from internlm.model.hf import write_hf_weights

    sizes = [(f"layers.{i}.mlp.up_proj.weight", 4000) for i in range(6)]
    alive, events = [], []

    def fetch(name):
        tensor = torch.full((1000,), float(len(alive)))
        alive.append(weakref.ref(tensor))
        events.append(("fetch", name))
        return tensor

    real_save = safetensors.torch.save_file

    def save_file(tensors, path, metadata=None):
        live = sum(ref() is not None for ref in alive)
        events.append(("save", os.path.basename(path), sorted(tensors), live))
        real_save(tensors, path, metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    files = write_hf_weights(str(tmp_path), sizes, fetch, max_shard_size=8000)
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    saves = [e for e in events if e[0] == "save"]
    assert [e[3] for e in saves] == [2, 2, 2]  # only the file being written is in memory
    assert [e[0] for e in events] == ["fetch", "fetch", "save"] * 3  # fetched just before its file is written


def test_sizes_and_shard_plan():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("400KB") == 400_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="size"):
        parse_size("five gigs")
    plan = plan_shards([("a", 60), ("b", 50), ("c", 200), ("d", 10)], 100)
    assert plan == [["a"], ["b"], ["c"], ["d"]]
    assert plan_shards([("a", 40), ("b", 50), ("c", 10)], 100) == [["a", "b", "c"]]
