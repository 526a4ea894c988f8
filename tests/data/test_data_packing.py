"""Packing of stream windows into sequences and micro-batches, and reading a stream across shards."""

import numpy as np
import pytest
import torch

from internlm.data import RollingShardWriter, TokenStream, collate, pack_window


def write_source(folder, doc_lengths, shard_tokens):
    """A data folder whose token at stream position p is 100 + p."""
    folder.mkdir()
    lengths = np.array(doc_lengths)
    writer = RollingShardWriter(str(folder), vocab_size=60000, eos_id=2, shard_tokens=shard_tokens)
    writer.add(100 + np.arange(lengths.sum()), lengths)
    return writer.close()


def test_pack_window_hand_made():
    # stream tokens 10..18 from t; documents end after stream offsets 3 and 6 (relative ends 3, 6)
    seq = pack_window(np.arange(10, 19), np.array([3, 6]), seq_len=8)
    assert seq.input_ids.tolist() == [10, 11, 12, 13, 14, 15, 16, 17]
    assert seq.labels.tolist() == [11, 12, -100, 14, 15, -100, 17, 18]
    assert seq.cu_seqlens.tolist() == [0, 3, 6, 8] and seq.cu_seqlens.dtype == np.int32
    assert seq.position_ids.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]


def test_pack_window_document_ending_at_window_end_and_data_end():
    seq = pack_window(np.arange(5), np.array([4]), seq_len=4)  # token 3 ends a document: no extra piece
    assert seq.labels.tolist() == [1, 2, 3, -100] and seq.cu_seqlens.tolist() == [0, 4]
    last = pack_window(np.arange(4), np.array([2, 4]), seq_len=4)  # only seq_len tokens: the data ends
    assert last.labels.tolist() == [1, -100, 3, -100] and last.position_ids.tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="needs 5 tokens"):
        pack_window(np.arange(3), np.array([]), seq_len=4)


def test_collate_layout():
    a = pack_window(np.arange(5), np.array([2]), seq_len=4)
    b = pack_window(np.arange(20, 25), np.array([]), seq_len=4)
    batch = collate([a, b])
    assert batch["input_ids"].shape == (1, 8) and batch["input_ids"].dtype == torch.int64
    assert batch["labels"].tolist() == [[1, -100, 3, 4, 21, 22, 23, 24]]
    assert batch["cu_seqlens"].tolist() == [0, 2, 4, 8] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1, 2, 3]]
    assert batch["max_seqlen"] == 4


def test_stream_reads_and_document_ends_across_shards(tmp_path):
    paths = write_source(tmp_path / "src", [3, 4, 2, 6, 1], shard_tokens=5)  # shards: [3,4] [2,6] [1]
    assert len(paths) == 3
    stream = TokenStream(str(tmp_path / "src"))
    assert stream.num_tokens == 16 and stream.num_docs == 5
    assert stream.read(5, 12).tolist() == list(range(105, 112))
    assert stream.doc_ends(0, 16).tolist() == [3, 7, 9, 15, 16]
    assert stream.doc_ends(3, 9).tolist() == [7, 9]  # (start, stop]: 3 excluded, 9 included
    assert stream.doc_ends(7, 8).tolist() == []
    assert stream.doc_start_at_or_before(8) == 7 and stream.doc_start_at_or_before(15) == 15
    seq = pack_window(stream.read(5, 12), stream.doc_ends(5, 11) - 5, seq_len=6)
    assert seq.labels.tolist() == [106, -100, 108, -100, 110, 111]
    assert seq.cu_seqlens.tolist() == [0, 2, 4, 6] and seq.position_ids.tolist() == [0, 1, 0, 1, 0, 1]
