"""Command-line overrides: ``--set key.path=value``, applied after ``_base_`` merging."""

from __future__ import annotations

import ast
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import ConfigError
from .keys import Section
from .schema import lookup


def parse_value(text: str) -> Any:
    """A Python literal (``8``, ``1e-4``, ``True``, ``None``, ``{'size': 2}``), else the text itself.

    The fallback keeps ``model.dtype=torch.float32`` and ``JOB_NAME=run1`` free of shell quoting.
    """
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text.strip()


def parse_overrides(items: Sequence[str], file: Optional[str] = None) -> List[Tuple[str, Any]]:
    """Parse ``["model.num_layers=4", "adam.lr=3e-4"]`` into ``[("model.num_layers", 4), ...]``.

    Raises ConfigError (``--set ITEM: ...``) for an item without ``=`` or with an empty key segment.
    """
    parsed = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--set {item}", "expected key.path=value, e.g. --set model.num_layers=4", file)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item}", "empty key; expected key.path=value", file)
        parsed.append((key, parse_value(value)))
    return parsed


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[Tuple[str, Any]]) -> None:
    """Set each ``key.path`` in ``raw`` in place, creating missing intermediate dicts.

    A dict value replaces the whole dict at its key (it does not merge). Unknown keys are left for
    validation, which reports them against the ``--set`` that introduced them.
    """
    for key, value in overrides:
        parts = key.split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            prefix = ".".join(parts[: depth + 1])
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                spec = lookup(prefix)
                if not (isinstance(spec, Section) and spec.shorthand):
                    raise ConfigError(f"--set {key}", f"'{prefix}' is {child!r}, not a dict")
                child = {spec.shorthand: child}  # tensor=2 then --set parallel.tensor.mode=...
            else:
                child = dict(child)  # never write into a dict a base file may share
            node[part] = child
            node = child
        node[parts[-1]] = value


def relabel(err: ConfigError, overrides: Sequence[Tuple[str, Any]]) -> ConfigError:
    """Name the ``--set`` behind an error about a key an override wrote (or created)."""
    if err.key.startswith("--set "):
        return err
    for key, _ in reversed(overrides):
        if err.key == key or err.key.startswith(key + "."):
            err.key = f"--set {err.key}"
            break
        if key.startswith(err.key + "."):
            err.key = f"--set {key}"
            break
    return err
