"""Raw text inputs as plain strings, for tokenizer training (`internlm.data.tokenizer`): a thin view of
`internlm.data.readers`, which reads every supported format (.txt, .jsonl[.gz|.zst], .parquet, .arrow and saved
Hugging Face datasets) in a fixed order. Everything streams: files are read in batches, never all at once.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, List, Union

from .readers import iter_documents as _iter_documents
from .readers import list_files


def no_documents_message(inputs: Iterable[Union[str, os.PathLike]]) -> str:
    """The one-line error for inputs that hold no document."""
    names = " ".join(os.fspath(i) for i in inputs)
    return (
        f"no documents were found in {names} (looked for .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet, .arrow "
        "files and saved Hugging Face datasets); check the path and --text-key"
    )


def list_input_files(inputs: Iterable[Union[str, os.PathLike]]) -> List[str]:
    """Expand files and folders into the ordered list of files to read; ValueError when there is none."""
    inputs = list(inputs)
    files = [f.path for f in list_files(inputs)]
    if not files:
        raise ValueError(no_documents_message(inputs))
    return files


def iter_documents(inputs: Iterable[Union[str, os.PathLike]], text_key: str = "text") -> Iterator[str]:
    """Stream the texts of the documents of files and folders, in reading order."""
    for doc in _iter_documents(list(inputs), text_key):
        yield doc.text
