"""`dump_config`: write a resolved config as a config file that loads back to an equal `Config`."""

from __future__ import annotations

import ast
import keyword
import os
from typing import Any, List, Mapping

from .errors import ConfigError

_INDENT = "    "


def _is_name(key: Any) -> bool:
    return isinstance(key, str) and key.isidentifier() and not keyword.iskeyword(key)


def _literal(value: Any, path: str) -> str:
    text = repr(value)
    try:
        ok = ast.literal_eval(text) == value
    except (ValueError, SyntaxError):
        ok = False
    if not ok:
        raise ConfigError(path, f"{value!r} is not a Python literal and cannot be written to a config file")
    return text


def format_value(value: Any, path: str, depth: int = 0) -> str:
    """Python source for ``value``: ``dict(key=...)`` blocks like InternLM's configs, literals elsewhere."""
    if isinstance(value, Mapping):
        if not value:
            return "dict()"
        pad, inner = _INDENT * depth, _INDENT * (depth + 1)
        lines: List[str] = []
        named = all(_is_name(k) for k in value)
        for key, item in value.items():
            text = format_value(item, f"{path}.{key}", depth + 1)
            lines.append(f"{inner}{key}={text}," if named else f"{inner}{_literal(key, path)}: {text},")
        body = "\n".join(lines)
        return f"dict(\n{body}\n{pad})" if named else f"{{\n{body}\n{pad}}}"
    if isinstance(value, (list, tuple)):
        items = [format_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
        return f"[{', '.join(items)}]"
    return _literal(value, path)


def dump_config(cfg: Mapping[str, Any], path: str) -> None:
    """Write ``cfg`` (resolved: every key present, no ``_base_``) to the Python file ``path``.

    Raises ConfigError naming the key when a value (e.g. a free constant) has no literal form.
    """
    sources = getattr(cfg, "source_files", None) or []
    header = ["# Resolved config written by internlm.config.dump_config; every key is explicit."]
    header += [f"# from: {source}" for source in sources]
    body = [f"{name} = {format_value(value, name)}" for name, value in cfg.items()]
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(header) + "\n\n" + "\n\n".join(body) + "\n")
