"""Validation data: hold-out disjoint from training, dp-size independent union, padding, valid_folder."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from internlm.data import RollingShardWriter, TokenStream, build_train_loader, build_valid_batches
from internlm.data.loader import holdout_start


def build_train_loader_from(data: dict, *args):
    """The data section as the loader reads it: an object with one attribute per key."""
    return build_train_loader(SimpleNamespace(**data), *args)


def build_valid_batches_from(data: dict, *args):
    """The data section as the loader reads it: an object with one attribute per key."""
    return build_valid_batches(SimpleNamespace(**data), *args)


def make_source(folder, size, base, seed):
    """A data folder whose token at stream position p is base + p, with documents of 5..40 tokens."""
    lengths = np.random.default_rng(seed).integers(5, 40, size=size)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), size) + 1]
    lengths[-1] -= lengths.sum() - size
    folder.mkdir()
    writer = RollingShardWriter(str(folder), vocab_size=60000, eos_id=2, shard_tokens=500)
    writer.add(base + np.arange(size), lengths)
    writer.close()
    return str(folder)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    return {
        "a": make_source(root / "a", 2000, 100, 0),
        "b": make_source(root / "b", 1000, 10000, 1),
        "v": make_source(root / "v", 304, 30000, 2),
    }


def data_cfg(sources, **extra):
    cfg = dict(
        seq_len=16,
        micro_bsz=2,
        micro_num=2,
        train_folder={sources["a"]: 1, sources["b"]: 1},
        valid_folder=None,
        valid_ratio=0.1,
        valid_max_samples=13,
        valid_micro_num=None,
        block_seqs=8,
    )
    cfg.update(extra)
    return cfg


def real_sequences(batches, seq_len):
    """Input ids of the non-padding sequences (padding has every label -100 and zero inputs)."""
    rows = [row for mb in batches for row in zip(mb["input_ids"].view(-1, seq_len), mb["labels"].view(-1, seq_len))]
    return [ids for ids, lab in rows if not (ids.eq(0).all() and lab.eq(-100).all())]


def test_holdout_is_disjoint_from_training(sources):
    cfg = data_cfg(sources)
    ends = {}
    for name, base in (("a", 100), ("b", 10000)):
        stream = TokenStream(sources[name])
        ends[name] = holdout_start(stream, 0.1)
        assert stream.doc_start_at_or_before(ends[name]) == ends[name]  # validation starts on a document
        assert abs(ends[name] - 0.9 * stream.num_tokens) <= 40
    loader = build_train_loader_from(cfg, 0, 0, 1)
    batches = [mb for _ in range(60) for mb in loader.next_global_batch()]
    seen = torch.cat([torch.cat([mb["input_ids"], mb["labels"]]) for mb in batches])
    assert loader.sampler.samplers[sources["b"]].cursor.epoch >= 1  # the training range was wrapped
    for name, base, top in (("a", 100, 2100), ("b", 10000, 11000)):
        train_pos = seen[(seen >= base) & (seen < top)] - base
        assert int(train_pos.max()) < ends[name]
    valid = torch.stack(real_sequences(build_valid_batches_from(cfg, 0, 0, 1), 16))
    assert len(valid) == 13
    for name, base, top in (("a", 100, 2100), ("b", 10000, 11000)):
        pos = valid[(valid >= base) & (valid < top)] - base
        assert pos.numel() and int(pos.min()) >= ends[name]
    assert valid[0, 0] == 100 + ends["a"] and valid[1, 0] == 10000 + ends["b"]  # round-robin over sources


def test_valid_union_independent_of_dp_size(sources):
    cfg = data_cfg(sources)
    reference = None
    for dp in (1, 2, 4):
        per_rank = [build_valid_batches_from(cfg, 0, r, dp) for r in range(dp)]
        rounds = len(per_rank[0])
        assert all(len(b) == rounds for b in per_rank) and rounds == -(-13 // (dp * 2))
        ordered = [mb for m in range(rounds) for r in range(dp) for mb in [per_rank[r][m]]]
        seqs = torch.stack(real_sequences(ordered, 16))
        padded = dp * 2 * rounds - 13
        labels = torch.cat([mb["labels"].view(-1, 16) for mb in ordered])
        assert int(labels.eq(-100).all(dim=1).sum()) >= padded
        reference = seqs if reference is None else reference
        assert torch.equal(seqs, reference)


def test_valid_micro_num_caps_and_valid_folder(sources):
    capped = build_valid_batches_from(data_cfg(sources, valid_micro_num=3), 0, 0, 1)
    assert len(capped) == 3 and len(real_sequences(capped, 16)) == 6
    cfg = data_cfg(sources, valid_folder=sources["v"], valid_max_samples=100)
    batches = build_valid_batches_from(cfg, 0, 0, 1)
    seqs = torch.stack(real_sequences(batches, 16))
    assert len(batches) == 10 and len(seqs) == 19 and seqs.min() >= 30000 and seqs[0, 0] == 30000
    last = batches[-1]["labels"].view(-1, 16)
    assert last[0, -1] == -100 and last[0, -2] == 30000 + 303  # the last window ends the data
    assert last[1].eq(-100).all()  # padding slot
    loader = build_train_loader_from(cfg, 0, 0, 1)  # with a valid folder nothing is held out
    assert loader.sources[sources["a"]].train_end == 2000
    assert build_valid_batches_from(data_cfg(sources, valid_ratio=0.0), 0, 0, 2) == []


def test_too_small_validation_is_an_error(sources):
    with pytest.raises(ValueError, match=r"no validation sequence of seq_len=64 .*a.: \d+ tokens"):
        build_valid_batches_from(data_cfg(sources, valid_ratio=0.001, seq_len=64), 0, 0, 1)
