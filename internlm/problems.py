"""`Problem`: one thing wrong with a config, as the key to change and what is wrong with it.

Checks in every package (model shape, parallel layout, pipeline partition) return lists of problems
instead of raising or formatting strings, so a caller can report all of them, name the key, and
attach the file (`internlm.config.ConfigError`) without parsing messages.
"""

from __future__ import annotations

from typing import NamedTuple


class Problem(NamedTuple):
    """``key``: dotted config key to change (``model.hidden_size``); ``message``: what is wrong with it."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


__all__ = ["Problem"]
