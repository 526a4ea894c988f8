"""The one exception type of the config system."""

from __future__ import annotations

from typing import Optional


class ConfigError(Exception):
    """A config problem, rendered as one line ``FILE: key.path: problem``.

    ``file`` is the config file the user passed (filled in by `load_config` when the error is raised
    deeper down), ``key`` the dotted key path (``--set key.path`` when a command-line override caused it).
    A single argument is taken as the whole, already formatted line (checks outside this package).
    """

    def __init__(self, key: str, problem: Optional[str] = None, file: Optional[str] = None) -> None:
        if problem is None:  # ConfigError("FILE: key: problem"): a line its caller formatted already
            key, problem = "", key
        self.key = key
        self.problem = problem
        self.file = file
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.key, self.problem) if p]
        # a multi-line message would break `train.py`'s one-line error contract
        return ": ".join(" ".join(str(p).split()) for p in parts)

    def __reduce__(self):
        return (ConfigError, (self.key, self.problem, self.file))

    def located(self, file: str) -> "ConfigError":
        """This error with ``file`` set, unless it already names one."""
        if self.file is None:
            self.file = file
        self.args = (str(self),)
        return self
