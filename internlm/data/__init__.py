"""Data pipeline: tokenizer, tokenized shards, packed sequences, mixture sampling, loaders, demo corpus.

    from internlm.data import build_train_loader, build_valid_batches
    loader = build_train_loader(run.data, seed, dp_rank, dp_size)  # run: a RunConfig
    micro_batches = loader.next_global_batch()      # this rank's micro_num micro-batch dicts

Names are imported lazily (PEP 562) so that tokenizer worker processes, which only need numpy and
sentencepiece, do not pay for importing torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DataError": "errors",
    "DataFileMissing": "errors",
    "DataChanged": "errors",
    "Tokenizer": "tokenizer",
    "train_sentencepiece": "tokenizer",
    "iter_documents": "corpus",
    "list_input_files": "corpus",
    "Shard": "shard",
    "ShardWriter": "shard",
    "RollingShardWriter": "shard",
    "list_shards": "shard",
    "token_dtype": "shard",
    "IndexedShard": "indexed",
    "open_shards": "sources",
    "TokenStream": "stream",
    "source_key": "stream",
    "tokenize_to_shards": "tokenize_corpus",
    "PackedSequence": "packing",
    "pack_window": "packing",
    "collate": "packing",
    "MixtureSampler": "sampler",
    "SourceSampler": "sampler",
    "TrainLoader": "loader",
    "build_train_loader": "loader",
    "build_valid_batches": "loader",
    "prepare_demo_data": "demo_corpus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'internlm.data' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
