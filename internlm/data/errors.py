"""The error type of bad data files: every one names the file and says what to do."""

from __future__ import annotations


class DataError(ValueError):
    """A data file (shard, shard meta, tokenizer model) or data folder that cannot be used. ``path`` is the file
    or folder; the message is one line that names it and what to do."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(" ".join(message.split()))


class DataFileMissing(DataError, FileNotFoundError):
    """A data file or folder that does not exist (also a FileNotFoundError)."""


class DataChanged(DataError):
    """A source's files differ from those its checkpointed cursor was recorded on. Every rank finds the same
    difference, so only rank 0 prints it (``local`` False)."""

    local = False


__all__ = ["DataChanged", "DataError", "DataFileMissing"]
