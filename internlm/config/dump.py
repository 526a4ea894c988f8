"""`dump_config`: write a resolved config as a config file that loads back to an equal `Config`."""

from __future__ import annotations

import ast
import keyword
import os
from typing import Any, List, Mapping

from .errors import ConfigError
from .schema import is_constant

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

    UPPER_CASE constants without a literal form (a pathlib.Path, say) are left out with a comment;
    a schema key without one raises ConfigError naming the key.
    """
    sources = getattr(cfg, "source_files", None) or []
    header = ["# Resolved config written by internlm.config.dump_config; every key is explicit."]
    header += [f"# from: {source}" for source in sources]
    body = []
    for name, value in cfg.items():
        try:
            body.append(f"{name} = {format_value(value, name)}")
        except ConfigError:
            if not is_constant(name):
                raise
            # free constants may hold any object; losing one must not stop a run from recording its config
            body.append(f"# {name} omitted: {type(value).__name__} value is not a Python literal")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(header) + "\n\n" + "\n\n".join(body) + "\n")
