"""`load_config`: execute an InternLM-format config file, merge its ``_base_`` files, apply overrides;
`load_run_config`: the same as a typed `RunConfig`.

A config file is plain Python. Its top-level names form the config, except names starting with ``_``
(but ``_base_``) and imported modules, functions and classes, which are helpers.
"""

from __future__ import annotations

import copy
import os
import runpy
import traceback
import types
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from .container import Config
from .errors import ConfigError
from .overrides import apply_overrides, parse_overrides, relabel
from .resolve import resolve
from .run_config import RunConfig

_HELPER_TYPES = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)


def _error_line(err: BaseException, path: str) -> str:
    """``line N`` of the innermost traceback frame inside ``path``, for a one-line report."""
    if isinstance(err, SyntaxError) and err.lineno is not None:
        return f"line {err.lineno}"
    target = os.path.abspath(path)
    lines = [f.lineno for f in traceback.extract_tb(err.__traceback__) if os.path.abspath(f.filename) == target]
    return f"line {lines[-1]}" if lines else "while executing"


def execute(path: str) -> Dict[str, Any]:
    """The config names defined by the Python file at ``path`` (no ``_base_`` handling)."""
    if not os.path.isfile(path):
        raise ConfigError("", "config file not found", path)
    try:
        namespace = runpy.run_path(path, run_name="__internlm_config__")
    except (Exception, SystemExit) as err:  # noqa: BLE001 - any failure of user code becomes a ConfigError
        message = err.msg if isinstance(err, SyntaxError) else str(err)
        raise ConfigError(_error_line(err, path), f"{type(err).__name__}: {message}", path) from None
    return {
        name: copy.deepcopy(value)
        for name, value in namespace.items()
        if (not name.startswith("_") or name == "_base_") and not isinstance(value, _HELPER_TYPES)
    }


def merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> Dict[str, Any]:
    """``child`` merged into ``base``: dicts merge recursively unless the child's has ``_delete_=True``."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and value.get("_delete_"):
            out[key] = strip_delete(value)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = strip_delete(value) if isinstance(value, Mapping) else value
    return out


def strip_delete(value: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of ``value`` without ``_delete_`` markers at any depth."""
    return {k: strip_delete(v) if isinstance(v, Mapping) else v for k, v in value.items() if k != "_delete_"}


def _base_paths(names: Mapping[str, Any], path: str) -> List[str]:
    bases = names.get("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, (list, tuple)) or not all(isinstance(b, str) for b in bases):
        raise ConfigError("_base_", f"expected a path or a list of paths, got {bases!r}", path)
    folder = os.path.dirname(os.path.abspath(path))
    resolved = []
    for base in bases:
        full = os.path.normpath(os.path.join(folder, os.path.expanduser(base)))
        if not os.path.isfile(full):
            raise ConfigError("_base_", f"base file {base!r} not found (looked for {full})", path)
        resolved.append(full)
    return resolved


def read_with_bases(path: str, chain: Tuple[str, ...] = ()) -> Tuple[Dict[str, Any], List[str]]:
    """The names of ``path`` merged over its bases (in order, each with its own bases), and the files read."""
    key = os.path.abspath(path)
    if key in chain:
        raise ConfigError("_base_", f"inheritance cycle: {' -> '.join(chain + (key,))}", path)
    names = execute(path)
    merged: Dict[str, Any] = {}
    files = [key]
    for base in _base_paths(names, path):
        base_names, base_files = read_with_bases(base, chain + (key,))
        merged = merge(merged, base_names)
        files += [f for f in base_files if f not in files]
    names.pop("_base_", None)
    return merge(merged, names), files


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """Load, merge, override, fill and check the config file at ``path``.

    ``overrides`` are ``key.path=value`` strings (``train.py --set``). Raises ConfigError, one line
    ``FILE: key.path: problem``, for anything wrong in the file, its bases or the overrides.
    """
    parsed = parse_overrides(overrides, file=path)
    try:
        raw, files = read_with_bases(path)
    except ConfigError as err:
        if err.file is not None and os.path.abspath(err.file) != os.path.abspath(path):
            # a problem in a base file: report it against the file the user passed
            where = ": ".join(p for p in (err.key, err.problem) if p)
            raise ConfigError("_base_", f"in {err.file}: {where}", path) from None
        raise err.located(path) from None
    try:
        apply_overrides(raw, parsed)
        stem = os.path.splitext(os.path.basename(path))[0]
        resolved = resolve(raw, stem)
    except ConfigError as err:
        raise relabel(err, parsed).located(path) from None
    cfg = Config(resolved)
    cfg.source_files = files
    return cfg


def load_run_config(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """`load_config` of ``path`` with ``overrides`` (``key.path=value`` strings), as a `RunConfig`."""
    return RunConfig.from_config(load_config(path, overrides), path)
