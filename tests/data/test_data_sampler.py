"""Mixture sampling and the train loader: determinism, dp independence, resume, proportions, phases."""

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from internlm.data import MixtureSampler, RollingShardWriter, SourceSampler, build_train_loader


def build_train_loader_from(data: dict, *args):
    """The data section as the loader reads it: an object with one attribute per key."""
    return build_train_loader(SimpleNamespace(**data), *args)


BASES = {"a": 100, "b": 10000, "c": 20000}  # token = base + stream position: tokens reveal source and position
SIZES = {"a": 3000, "b": 1500, "c": 2000}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    out = {}
    for name, size in SIZES.items():
        lengths = rng.integers(5, 60, size=size)
        lengths = lengths[: np.searchsorted(np.cumsum(lengths), size) + 1]
        lengths[-1] -= lengths.sum() - size
        writer = RollingShardWriter(str(root / name), vocab_size=60000, eos_id=2, shard_tokens=700)
        (root / name).mkdir()
        writer.add(BASES[name] + np.arange(size), lengths)
        writer.close()
        out[name] = str(root / name)
    return out


def cfg(folders, weights, seq_len=16, micro_bsz=2, micro_num=2, **extra):
    data = dict(
        seq_len=seq_len,
        micro_bsz=micro_bsz,
        micro_num=micro_num,
        valid_folder=None,
        valid_ratio=0.0,
        train_folder={folders[k]: w for k, w in weights.items()},
        block_seqs=8,
    )
    data.update(extra)
    return data


def global_batches(data, steps, dp_size, seed=7):
    """Concatenate every rank's micro-batches in rank order: the global batch as one tensor per step."""
    loaders = [build_train_loader_from(data, seed, r, dp_size) for r in range(dp_size)]
    out = []
    for _ in range(steps):
        per_rank = [loader.next_global_batch() for loader in loaders]
        out.append(torch.cat([mb["input_ids"].view(-1, data["seq_len"]) for mbs in per_rank for mb in mbs]))
    return out, loaders


def positions(input_ids, name):
    """Stream positions of source ``name`` seen in a (n, seq_len) tensor of input ids."""
    ids = input_ids.flatten().numpy()
    lo = BASES[name]
    return set((ids[(ids >= lo) & (ids < lo + SIZES[name])] - lo).tolist())


def test_global_batches_independent_of_dp_size(folders):
    weights = {"a": 2, "b": 1}
    ref, loaders = global_batches(cfg(folders, weights, micro_bsz=2, micro_num=4), 4, dp_size=1)
    for dp, micro_num in ((2, 2), (4, 1)):
        got, dp_loaders = global_batches(cfg(folders, weights, micro_bsz=2, micro_num=micro_num), 4, dp_size=dp)
        assert all(torch.equal(x, y) for x, y in zip(ref, got))
        assert all(loader.state_dict() == loaders[0].state_dict() for loader in dp_loaders)
    other_seed, _ = global_batches(cfg(folders, weights, micro_bsz=2, micro_num=4), 4, dp_size=1, seed=8)
    assert not all(torch.equal(x, y) for x, y in zip(ref, other_seed))


def test_micro_batch_layout(folders):
    loader = build_train_loader_from(cfg(folders, {"a": 1}, seq_len=16, micro_bsz=3, micro_num=2), 0, 1, 2)
    mbs = loader.next_global_batch()
    assert len(mbs) == 2
    for mb in mbs:
        assert mb["input_ids"].shape == mb["labels"].shape == mb["position_ids"].shape == (1, 48)
        cu = mb["cu_seqlens"].tolist()
        assert {0, 16, 32, 48} <= set(cu) and cu == sorted(set(cu))
        assert mb["max_seqlen"] == max(np.diff(cu))
        assert (mb["position_ids"][0, torch.tensor(cu[:-1])] == 0).all()
    assert loader.last_batch_source_tokens == {folders["a"]: 2 * 3 * 2 * 16}


def test_exact_resume_from_state_dict(folders):
    data = cfg(folders, {"a": 3, "b": 1, "c": 1}, seq_len=64)
    straight, _ = global_batches(data, 30, dp_size=1)  # 120 sequences: crosses blocks, wraps a and b
    first, loaders = global_batches(data, 12, dp_size=1)
    state = json.loads(json.dumps(loaders[0].state_dict()))  # checkpoints store it as plain data
    resumed = build_train_loader_from(data, 7, 0, 1)
    resumed.load_state_dict(state)
    rest = [torch.cat([mb["input_ids"].view(-1, 64) for mb in resumed.next_global_batch()]) for _ in range(18)]
    assert all(torch.equal(x, y) for x, y in zip(straight, first + rest, strict=True))
    sid_a = loaders[0].sampler.identities[folders["a"]].sid  # cursors are keyed by source id
    assert state["sources"][sid_a]["taken"] not in (0, 8)  # resumed in the middle of a block
    assert resumed.sampler.samplers[folders["b"]].cursor.epoch == 1


def test_mixture_proportions_are_exact_for_every_prefix(folders):
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    sampler = MixtureSampler({k: SIZES[k] for k in weights}, weights, seq_len=16, seed=0)
    counts = Counter()
    for n in range(1, 501):
        counts[sampler.next_sequences(1)[0][0]] += 1
        assert all(abs(counts[k] - n * w) < 1 for k, w in weights.items())
    assert counts == {"a": 250, "b": 150, "c": 100}
    loader = build_train_loader_from(cfg(folders, {"a": 3, "b": 1}), 0, 0, 1)
    loader.next_global_batch()
    assert loader.last_batch_source_tokens == {folders["a"]: 3 * 16, folders["b"]: 1 * 16}


def test_source_epochs_cover_every_window_once_in_shuffled_order():
    sampler = SourceSampler("src", train_end=16 * 10 + 1, seq_len=16, seed=3, block_seqs=4)
    epoch0 = [sampler.next_start() for _ in range(10)]
    epoch1 = [sampler.next_start() for _ in range(10)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(0, 160, 16))
    assert sorted(epoch0[:4]) == [0, 16, 32, 48]  # blocks are visited in order, shuffled inside
    assert epoch0 != epoch1 and epoch0 != sorted(epoch0)
    assert sampler.cursor.epoch == 1


def test_later_phase_continues_after_consumed_data(folders):
    phase1, loaders = global_batches(cfg(folders, {"a": 1, "b": 1}), 3, dp_size=1)
    seen_a, seen_b = positions(torch.cat(phase1), "a"), positions(torch.cat(phase1), "b")
    state = loaders[0].state_dict()

    # phase 2: other seq_len, batch size and weights; b leaves the mixture, c joins
    data2 = cfg(folders, {"a": 1, "c": 2}, seq_len=24, micro_bsz=3, micro_num=2)
    phase2 = build_train_loader_from(data2, 7, 0, 1)
    phase2.load_state_dict(state)
    got = torch.cat([mb["input_ids"] for _ in range(5) for mb in phase2.next_global_batch()])
    assert positions(got, "a") and not positions(got, "a") & seen_a
    assert min(positions(got, "a")) >= max(seen_a)  # continues after the consumed blocks
    fresh = build_train_loader_from(data2, 7, 0, 1)  # control: without the state, a is sampled again
    again = torch.cat([mb["input_ids"] for _ in range(5) for mb in fresh.next_global_batch()])
    assert positions(again, "a") & seen_a

    # phase 3: b comes back; its cursor was carried through phase 2 untouched
    state2 = phase2.state_dict()
    sid_b = loaders[0].sampler.identities[folders["b"]].sid  # cursors are keyed by source id
    assert state2["sources"][sid_b] == state["sources"][sid_b]
    phase3 = build_train_loader_from(cfg(folders, {"b": 1}, seq_len=16), 7, 0, 1)
    phase3.load_state_dict(state2)
    got_b = torch.cat([mb["input_ids"] for mb in phase3.next_global_batch()])
    assert not positions(got_b, "b") & seen_b


def test_unchanged_weights_keep_mixture_counts_new_weights_reset_them(folders):
    loader = build_train_loader_from(cfg(folders, {"a": 1, "b": 1}), 0, 0, 1)
    loader.next_global_batch()
    same = build_train_loader_from(cfg(folders, {"a": 2, "b": 2}, seq_len=32), 0, 0, 1)  # same proportions
    same.load_state_dict(loader.state_dict())
    assert same.sampler.total == 4
    changed = build_train_loader_from(cfg(folders, {"a": 1, "b": 3}), 0, 0, 1)
    changed.load_state_dict(loader.state_dict())
    assert changed.sampler.total == 0 and changed.sampler.samplers[folders["a"]].cursor.taken == 2


def test_clear_errors(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_train_loader_from(cfg(folders, {"a": 1}) | {"train_folder": str(tmp_path / "nope")}, 0, 0, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .bin shards"):
        build_train_loader_from(cfg(folders, {"a": 1}) | {"train_folder": str(tmp_path / "empty")}, 0, 0, 1)
    with pytest.raises(ValueError, match=r"'.*b' has 1500 training tokens.*seq_len \+ 1 = 2001"):
        build_train_loader_from(cfg(folders, {"b": 1}, seq_len=2000), 0, 0, 1)
    with pytest.raises(ValueError, match="weight of source"):
        build_train_loader_from(cfg(folders, {"a": -1.0}), 0, 0, 1)
