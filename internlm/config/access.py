"""Reading a key from a config section, whatever its form: a resolved `Config`, a plain dict (tests, research
code) or an attribute-style object."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_MISSING = object()


def section_get(section: Any, key: str, default: Any = _MISSING) -> Any:
    """``section[key]``; `default` when the key is absent; KeyError naming the key when there is no default."""
    if isinstance(section, Mapping):
        value = section.get(key, _MISSING)
    else:
        value = getattr(section, key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise KeyError(f"config section has no key {key!r}")
        return default
    return value
