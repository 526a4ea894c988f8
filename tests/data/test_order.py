"""Data order independent of where the data lives, old (path-keyed) states, and changed data caught on resume."""

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from internlm.data import MixtureSampler, RollingShardWriter, build_train_loader
from internlm.data.errors import DataChanged
from internlm.data.fingerprint import make_fingerprint, map_offset


def write_source(folder, size, base, seed, shard_tokens=500):
    """A data folder whose token at stream position p is base + p, documents of 5..40 tokens."""
    lengths = np.random.default_rng(seed).integers(5, 40, size=size)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), size) + 1]
    lengths[-1] -= lengths.sum() - size
    os.makedirs(folder)
    writer = RollingShardWriter(str(folder), vocab_size=60000, eos_id=2, shard_tokens=shard_tokens)
    writer.add(base + np.arange(size), lengths)
    writer.close()
    return str(folder)


def data(train_folder, **extra):
    ns = dict(seq_len=16, micro_bsz=2, micro_num=2, valid_folder=None, valid_ratio=0.0, block_seqs=8)
    return SimpleNamespace(**(ns | {"train_folder": train_folder} | extra))


def batches(loader, steps):
    return [
        np.concatenate([mb["input_ids"].numpy().ravel() for mb in loader.next_global_batch()]) for _ in range(steps)
    ]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture()
def two(tmp_path):
    return {"a": write_source(tmp_path / "a", 3000, 100, 0), "b": write_source(tmp_path / "b", 1500, 10000, 1)}


def test_moved_folders_keep_order_and_resume_exactly(tmp_path, two):
    cfg = {two["a"]: 2, two["b"]: 1}
    straight = batches(build_train_loader(data(cfg), 7, 0, 1), 24)
    first = build_train_loader(data(cfg), 7, 0, 1)
    head = batches(first, 10)
    state = json.loads(json.dumps(first.state_dict()))
    moved = {}
    for name, path in two.items():  # another mount, and the names swap their sort order
        moved[name] = str(tmp_path / "elsewhere" / ("z" if name == "a" else "y"))
        shutil.copytree(path, moved[name])
    resumed = build_train_loader(data({moved["a"]: 2, moved["b"]: 1}), 7, 0, 1)
    resumed.load_state_dict(state)
    assert resumed.pop_messages() == []
    assert same(straight, head + batches(resumed, 14))
    fresh_moved = batches(build_train_loader(data({moved["a"]: 2, moved["b"]: 1}), 7, 0, 1), 24)
    assert same(straight, fresh_moved)  # a fresh run on the moved data draws the same batches too


def test_version1_state_resumes_with_its_path_seeded_order(two):
    # the sampler of state version 1: cursors keyed by path, permutations seeded by sha256(path)
    weights = {two["a"]: 2.0, two["b"]: 1.0}
    old = MixtureSampler({two["a"]: 3000, two["b"]: 1500}, weights, 16, 7, 8)
    old.next_sequences(40)
    saved = old.state_dict()
    v1 = {
        "version": 1,
        "sources": {
            e["path"]: {k: v for k, v in e.items() if k not in ("path", "fingerprint", "order")}
            for e in saved["sources"].values()
        },
        "mixture": saved["mixture"],
        "steps": 5,
    }
    expected = old.next_sequences(60)
    loader = build_train_loader(data(weights), 7, 0, 1)
    loader.load_state_dict(json.loads(json.dumps(v1)))
    assert loader.sampler.next_sequences(60) == expected
    notes = loader.pop_messages()
    assert len(notes) == 1 and "state version 1" in notes[0]
    assert loader.state_dict()["version"] == 2  # saved in the new format from here on, its order kept
    assert {e["order"] for e in loader.state_dict()["sources"].values()} == {
        e["order"] for e in saved["sources"].values()
    }


def _append_shard(folder, base, tokens=400):
    extra = os.path.join(os.path.dirname(folder), "extra")
    write_source(extra, tokens, base, 9, shard_tokens=tokens)
    for name in os.listdir(extra):
        shutil.move(os.path.join(extra, name), os.path.join(folder, name.replace("shard_", "zz_")))


def test_added_shard_stops_the_resume_with_one_line(two):
    cfg = {two["a"]: 2, two["b"]: 1}
    loader = build_train_loader(data(cfg, valid_ratio=0.1), 7, 0, 1)
    batches(loader, 4)
    state = json.loads(json.dumps(loader.state_dict()))
    _append_shard(two["b"], 50000)
    with pytest.raises(DataChanged) as err:
        build_train_loader(data(cfg, valid_ratio=0.1), 7, 0, 1).load_state_dict(state)
    message = str(err.value)
    assert "\n" not in message and two["b"] in message and "added zz_00000.bin" in message
    assert "data.accept_changed_data=True" in message and two["a"] not in message

    accepting = build_train_loader(data(cfg, valid_ratio=0.1, accept_changed_data=True), 7, 0, 1)
    accepting.load_state_dict(state)
    (note,) = accepting.pop_messages()
    assert note.startswith(f"warning: data changed in source {two['b']} (added zz_00000.bin)")
    assert "continues at token" in note and "held out for validation before are now trained on" in note


def test_changed_first_shard_maps_the_position_to_the_same_file(tmp_path):
    src = write_source(tmp_path / "s", 3000, 100, 0)
    loader = build_train_loader(data(src), 7, 0, 1)
    batches(loader, 30)  # 120 sequences of 16 tokens: into the fourth shard
    state = loader.state_dict()
    (entry,) = state["sources"].values()
    os.remove(os.path.join(src, "shard_00000.bin"))
    os.remove(os.path.join(src, "shard_00000.bin.meta"))
    with pytest.raises(DataChanged, match="removed shard_00000.bin"):
        build_train_loader(data(src), 7, 0, 1).load_state_dict(state)
    accepting = build_train_loader(data(src, accept_changed_data=True), 7, 0, 1)
    accepting.load_state_dict(state)
    cursor = accepting.sampler.samplers[src].cursor
    first_len = entry["fingerprint"]["files"][0][2]
    resume_at = entry["block_start"] + (entry["block_len"] * 16 if entry["taken"] else 0)
    assert cursor.block_start == resume_at - first_len and cursor.order == entry["order"]


def test_map_offset():
    old = make_fingerprint([("a", 10, 100, 1), ("b", 10, 50, 1), ("c", 10, 30, 1)], 180)
    grown = make_fingerprint([("0", 10, 20, 1), ("a", 10, 100, 1), ("b", 10, 50, 1), ("c", 10, 30, 1)], 200)
    assert map_offset(old, grown, 120) == (140, True)
    edited = make_fingerprint([("a", 10, 100, 1), ("b", 12, 60, 1), ("c", 10, 30, 1)], 190)
    assert map_offset(old, edited, 120) == (160, False)  # b changed: the start of c
    assert map_offset(old, edited, 99) == (99, True)
    assert map_offset(old, old, 180) == (180, True)
