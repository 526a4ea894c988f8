"""SentencePiece tokenizer: loading and training.

Ids follow the InternLM convention: ``<unk>`` = 0, ``<s>`` (BOS) = 1, ``</s>`` (EOS) = 2. Models trained
here use identity normalisation, no dummy prefix and byte fallback, so ``decode(encode(text)) == text``
for any Unicode text (characters outside the vocabulary become UTF-8 byte pieces).
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, List, Sequence, Union

import sentencepiece as spm

from .corpus import iter_documents
from .errors import DataError, DataFileMissing

# 256 byte-fallback pieces + <unk>, <s>, </s>: the smallest vocabulary that still has learned pieces.
_MIN_VOCAB = 256 + 3 + 1


class Tokenizer:
    """A SentencePiece model loaded from ``model_path`` (a ``.model`` file)."""

    def __init__(self, model_path: Union[str, os.PathLike]) -> None:
        self.model_path = os.fspath(model_path)
        if not os.path.isfile(self.model_path):
            raise DataFileMissing(
                self.model_path,
                f"tokenizer model {self.model_path!r} not found; train one with tools/train_tokenizer.py",
            )
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        except (RuntimeError, OSError) as exc:  # sentencepiece raises RuntimeError for a file it cannot parse
            reason = " ".join(str(exc).split())[:200]
            raise DataError(
                self.model_path,
                f"tokenizer model {self.model_path!r} is not a SentencePiece model ({reason}); point "
                f"data.tokenizer_path at a .model file (train one with tools/train_tokenizer.py)",
            ) from None
        if self.eos_id < 0:
            raise DataError(
                self.model_path, f"tokenizer model {self.model_path!r} has no EOS piece; retrain it with eos_id >= 0"
            )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text``, without BOS or EOS."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def score(self, token_id: int) -> float:
        """The piece's learned score (log probability for unigram, merge rank for BPE)."""
        return self._sp.get_score(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def _lines(texts_or_files: Iterable[Union[str, os.PathLike]]) -> Iterator[str]:
    """Training sentences: every non-blank line of every document.

    SentencePiece learns from single lines (it drops sentences longer than ``max_sentence_length``),
    so documents are split at newlines; newlines themselves are encoded through byte fallback.
    """

    for item in texts_or_files:
        docs = iter_documents([item]) if isinstance(item, os.PathLike) else (item,)
        for doc in docs:
            for line in doc.split("\n"):
                if line.strip():
                    yield line


def train_sentencepiece(
    texts_or_files: Iterable[Union[str, os.PathLike]],
    model_prefix: Union[str, os.PathLike],
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
    seed: int = 0,
    num_threads: int = 1,
) -> str:
    """Train a byte-fallback SentencePiece model and return the path of ``<model_prefix>.model``.

    ``texts_or_files`` mixes documents (``str``) and ``pathlib.Path`` objects naming ``.txt``/``.jsonl``
    files or folders (read as in ``tools/tokenizer.py``); it is consumed as a stream. Training is deterministic for a
    given input and ``seed`` (one thread; the random generator is seeded; at most ``max_sentences``
    lines are sampled by SentencePiece's seeded reservoir).
    """
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback needs at least {_MIN_VOCAB}")
    model_prefix = os.fspath(model_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts_or_files),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=character_coverage,
        normalization_rule_name="identity",  # exact round trip: no NFKC, no whitespace folding
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,  # code indentation becomes whole pieces
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=16384,
        num_threads=num_threads,
        minloglevel=2,
    )
    return model_prefix + ".model"
