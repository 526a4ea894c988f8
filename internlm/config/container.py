"""`Config`: the resolved config, a plain dict with attribute access on nested dicts."""

from __future__ import annotations

from typing import Any, Mapping


class Config(dict):
    """A dict whose nested dicts are `Config` too, so ``cfg.data.seq_len == cfg["data"]["seq_len"]``.

    It pickles as a dict (multiprocessing data workers receive it). ``source_files`` lists the config
    files that were read (the user's file first, then its ``_base_`` files); it is not part of equality.
    """

    _ATTRIBUTES = ("source_files",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for key, value in self.items():
            if isinstance(value, Mapping) and not isinstance(value, Config):
                super().__setitem__(key, Config(value))
        self.__dict__.setdefault("source_files", [])

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails; must raise AttributeError (pickle and copy probe dunders)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._ATTRIBUTES:
            self.__dict__[name] = value
        else:
            self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, Mapping) and not isinstance(value, Config):
            value = Config(value)
        super().__setitem__(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        # route through __setitem__ so merged-in dicts get attribute access too
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def to_dict(self) -> dict:
        """A deep copy made of plain dicts."""
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}
