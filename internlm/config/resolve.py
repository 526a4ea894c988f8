"""Turn the raw names of a config file into a complete, checked config.

Three passes: apply the model preset, check every key against the schema while filling defaults, then
fill the defaults that depend on other keys and check the relations between keys (`validate`).
"""

from __future__ import annotations

import copy
import difflib
from typing import Any, Dict, Mapping, cast

from internlm.model.config import PRESETS

from .errors import ConfigError
from .keys import FIXED, Key, Section, type_name
from .model_config import config_key
from .schema import ROOT, is_constant, lookup
from .validate import fill_derived, validate


def unknown_key(path: str, name: str, known: Any) -> ConfigError:
    """The error for an unknown key, suggesting the closest known one."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(path, f"unknown key '{path}'{hint}")


def check_value(spec: Key, value: Any, path: str) -> Any:
    """Check one leaf value against its schema entry and return its canonical form."""
    types = spec.types
    if isinstance(value, bool) and bool not in types:
        ok = False  # bool subclasses int, but True is never a layer count
    elif isinstance(value, int) and not isinstance(value, bool) and int not in types and float in types:
        value, ok = float(value), True
    else:
        ok = isinstance(value, types)
    if not ok:
        raise ConfigError(path, f"expected {type_name(types)}, got {type(value).__name__} {value!r}")
    if spec.normalize is not None and value is not None:
        try:
            value = spec.normalize(value)
        except ValueError as err:
            raise ConfigError(path, str(err)) from None
    if spec.choices is not None and value not in spec.choices:
        allowed = ", ".join(repr(c) for c in spec.choices)
        raise ConfigError(path, f"{value!r} is not supported; use one of {allowed}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if spec.minimum is not None and value < spec.minimum:
            raise ConfigError(path, f"must be >= {spec.minimum:g}, got {value!r}")
        if spec.maximum is not None and value > spec.maximum:
            raise ConfigError(path, f"must be <= {spec.maximum:g}, got {value!r}")
    if spec.compat == FIXED and value != spec.default:
        raise ConfigError(path, f"{value!r} is not supported (InternLM compatibility key, only {spec.default!r})")
    return value


def resolve_section(section: Section, raw: Any, path: str) -> Dict[str, Any]:
    """Check ``raw`` against ``section`` and return it with every key present."""
    if section.shorthand is not None and not isinstance(raw, Mapping):
        raw = {section.shorthand: raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"expected a dict, got {type(raw).__name__} {raw!r}")
    for name in raw:
        if name not in section.fields:
            raise unknown_key(f"{path}.{name}", str(name), section.fields)
    out: Dict[str, Any] = {}
    for name, spec in section.fields.items():
        key = f"{path}.{name}"
        if isinstance(spec, Section):
            out[name] = resolve_section(spec, raw.get(name, {}), key)
        else:
            out[name] = check_value(spec, copy.deepcopy(raw[name]) if name in raw else copy.deepcopy(spec.default), key)
    return out


def apply_preset(model: Mapping[str, Any]) -> Dict[str, Any]:
    """``model`` with the preset's values under every key it does not set itself."""
    out = dict(model)
    name = check_value(cast(Key, lookup("model.preset")), out.get("preset"), "model.preset")
    if name is None:
        return out
    if name not in PRESETS:
        raise ConfigError("model.preset", f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    for field, value in PRESETS[name].items():  # presets name InternLMConfig fields
        out.setdefault(config_key(field), value)
    return out


def resolve(raw: Mapping[str, Any], stem: str) -> Dict[str, Any]:
    """The complete config from a file's names (``_base_`` merged, overrides applied).

    ``stem`` is the config file's name without extension, the default phase name.
    """
    raw = dict(raw)
    for name in raw:
        if not is_constant(name) and name not in ROOT.fields:
            raise unknown_key(name, name, ROOT.fields)
    if isinstance(raw.get("model"), Mapping):
        raw["model"] = apply_preset(raw["model"])
    out: Dict[str, Any] = {}
    for name, spec in ROOT.fields.items():
        if isinstance(spec, Section):
            out[name] = resolve_section(spec, raw.get(name, {}), name)
        else:
            out[name] = check_value(spec, raw.get(name, copy.deepcopy(spec.default)), name)
    fill_derived(out, stem)
    validate(out)
    # constants keep their place after the schema keys: they are free-form and never validated
    out.update({name: value for name, value in raw.items() if is_constant(name)})
    return out


__all__ = ["resolve", "resolve_section", "check_value", "apply_preset", "unknown_key"]
