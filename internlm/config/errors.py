"""The one exception type of the config system."""

from __future__ import annotations

from typing import Optional

from internlm.problems import Problem


class ConfigError(Exception):
    """A config problem, rendered as one line ``FILE: key.path: problem``.

    ``key`` is the dotted key path (``--set key.path`` when a command-line override caused it; ``""`` when
    no key applies, as for a missing file), ``problem`` what is wrong with it, and ``file`` the config file
    the user passed (filled in by `load_config` when the error is raised deeper down).
    """

    def __init__(self, key: str, problem: str, file: Optional[str] = None) -> None:
        self.key = key
        self.problem = problem
        self.file = file
        super().__init__(str(self))

    @classmethod
    def from_problem(cls, problem: Problem, file: Optional[str] = None) -> "ConfigError":
        """The error for a `Problem` whose key is a dotted config key (``model.hidden_size``)."""
        return cls(problem.key, problem.message, file)

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
