"""How a config key is declared: one field of a frozen dataclass per key, its rules in its annotation.

    @section("data")
    @dataclasses.dataclass(frozen=True)
    class DataSection:
        \"\"\"Batch shape, run length and data sources.\"\"\"

        seq_len: Annotated[int, key(2048, "tokens per packed sequence", minimum=1)]
        total_steps: Annotated[Optional[int], key(None, "optimizer steps of this phase", minimum=1)]

The type (``int``) is the type of the resolved value and, unless ``accepts`` widens it, what a config file may
give; `key` holds the default, doc and checks. `section` reads every field back once into a `Section` of `Key`s with
their types (`spec_of`), the one description that validation (`internlm.config.resolve`), the typed sections and the key
reference of docs/config.md (`internlm.config.docs`) all use.

Why ``Annotated`` and not ``= dataclasses.field(metadata=...)``: the dataclasses have no defaults of their own (an
instance is built from a resolved config, `section_from`, which holds every key; the defaults are filled by
`load_config`), and a type checker reads any ``= call(...)`` but ``dataclasses.field`` as a default.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import typing
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type, TypeVar, Union

import torch

from .errors import ConfigError

T = TypeVar("T")
NoneType = type(None)

# InternLM compatibility modes of a key
IGNORED = "ignored"  # accepted with any value of the right type, has no effect
FIXED = "fixed"  # accepted only at InternLM's default value
# accepted where the value means what this framework does (the doc says why), any other value is rejected with
# what to use instead (the field's normalize, or internlm.config.compat.check_compat); docs/internlm_compat.md
EQUIVALENT = "equivalent"

_SECTION = "__config_section__"  # the class attribute `section` writes


@dataclasses.dataclass(frozen=True)
class Section:
    """A dict of keys, read back from a section class ``cls`` found at the dotted ``path`` ("" for the root).

    With ``shorthand``, a bare value stands for ``{shorthand: value}`` (InternLM's ``tensor=8`` for
    ``tensor=dict(size=8, mode="mtp")``).
    """

    fields: Mapping[str, Union[Key, "Section"]]
    doc: str
    shorthand: Optional[str] = None
    path: str = ""
    cls: Optional[type] = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Key:
    """The rules of one leaf key, as written at its field (`key`); `section` reads them back with ``types`` set.

    ``types``: accepted Python types (an int is also accepted where float is, a bool never where int is), from the
    field's annotation, or ``accepts`` when a file may give a wider type (``torch.dtype`` for the str
    ``model.dtype``). A ``dict`` among them means a free-form dict whose contents are not key-checked.
    ``normalize`` maps an accepted value to its canonical form, raising ValueError with the problem.
    ``default_text``: how the default is shown in the docs, when its repr is unreadable.
    """

    default: Any
    doc: str
    choices: Optional[Tuple[Any, ...]] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    compat: Optional[str] = None
    normalize: Optional[Callable[[Any], Any]] = None
    default_text: Optional[str] = None
    accepts: Optional[Tuple[type, ...]] = None
    types: Tuple[type, ...] = ()


def key(
    default: Any,
    doc: str,
    *,
    choices: Optional[Tuple[Any, ...]] = None,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    compat: Optional[str] = None,
    normalize: Optional[Callable[[Any], Any]] = None,
    default_text: Optional[str] = None,
    accepts: Optional[Tuple[type, ...]] = None,
) -> Key:
    """The rules of a config key, for its field's annotation (``Annotated[int, key(...)]``): its default (filled by
    `load_config`, not by the dataclass), doc, allowed values (``choices``, ``minimum``/``maximum``), InternLM
    ``compat`` mode and ``normalize`` function. ``accepts``: the types a file may give when wider than the field's
    type (``torch.dtype`` for the str ``model.dtype``)."""
    return Key(default, doc, choices, minimum, maximum, compat, normalize, default_text, accepts)


def _types_of(hint: Any) -> Tuple[type, ...]:
    # Optional[int] -> (int, NoneType); Union[str, Dict[str, float], None] -> (str, dict, NoneType)
    args = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
    return tuple(typing.get_origin(arg) or arg for arg in args)


def section(
    path: str, shorthand: Optional[str] = None, doc: Optional[str] = None, not_keys: Tuple[str, ...] = ()
) -> Callable[[Type[T]], Type[T]]:
    """Register a frozen dataclass as the config section at ``path`` ("parallel.tensor"; "" for the root).

    Every field is a key (``Annotated[type, key(...)]``), a section class (whose path must be ``path.field``) or
    named in ``not_keys`` (`RunConfig`'s ``raw``, ``file``, ``model_config``). ``doc``: the section's text in
    docs/config.md; by default the class docstring, joined onto one line (and kept as ``__doc__``).
    """

    def register(cls: Type[T]) -> Type[T]:
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{cls.__name__}: decorate a frozen dataclass with @section")
        hints = typing.get_type_hints(cls, include_extras=True)
        fields: Dict[str, Union[Key, Section]] = {}
        for field in dataclasses.fields(cls):
            hint = hints[field.name]
            rules = [extra for extra in getattr(hint, "__metadata__", ()) if isinstance(extra, Key)]
            if rules:
                rule = rules[0]
                types = rule.accepts or _types_of(typing.get_args(hint)[0])
                fields[field.name] = dataclasses.replace(rule, types=types)
            elif is_section_class(hint):
                child = spec_of(hint)
                if child.path != (f"{path}.{field.name}" if path else field.name):
                    raise TypeError(f"{cls.__name__}.{field.name}: {hint.__name__} is the section {child.path!r}")
                fields[field.name] = child
            elif field.name not in not_keys:
                raise TypeError(f"{cls.__name__}.{field.name} is neither a key() nor a config section")
        text = doc if doc is not None else " ".join(inspect.cleandoc(cls.__doc__ or "").split())
        if doc is None:
            cls.__doc__ = text
        setattr(cls, _SECTION, Section(fields=fields, doc=text, shorthand=shorthand, path=path, cls=cls))
        return cls

    return register


def is_section_class(cls: Any) -> bool:
    """Whether ``cls`` is a class registered with `section`."""
    return isinstance(cls, type) and _SECTION in cls.__dict__


def spec_of(cls: type) -> Section:
    """The `Section` read from the section class ``cls``."""
    if not is_section_class(cls):
        raise TypeError(f"{cls!r} is not a config section class")
    return cls.__dict__[_SECTION]


def type_name(types: Tuple[type, ...]) -> str:
    """``(int, NoneType)`` -> ``"int or None"``, as the docs and the type errors write it."""
    names = {NoneType: "None", dict: "dict", torch.dtype: "torch.dtype"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _plain(value: Any) -> Any:
    # a typed section holds plain values: nested `Config` dicts become dicts, and nothing is shared with the source
    if isinstance(value, Mapping):
        return {name: _plain(item) for name, item in value.items()}
    return copy.deepcopy(value)


def section_values(cls: type, mapping: Mapping[str, Any]) -> Dict[str, Any]:
    """The constructor arguments (the config keys) of the section class ``cls`` from a resolved section dict.

    Nested sections become instances of their classes. Raises ConfigError naming a missing or unknown key.
    """
    spec = spec_of(cls)
    where = f"{spec.path}." if spec.path else ""
    if not isinstance(mapping, Mapping):
        raise ConfigError(spec.path, f"expected a resolved section dict, got {type(mapping).__name__} {mapping!r}")
    for name in spec.fields:
        if name not in mapping:
            raise ConfigError(where + name, "missing; typed sections are built from a resolved config (load_config)")
    if spec.path:  # the root also holds free UPPER_CASE constants
        for name in mapping:
            if name not in spec.fields:
                raise ConfigError(where + str(name), "not a key of this section")
    return {
        name: section_from(child, mapping[name]) if isinstance(child, Section) else _plain(mapping[name])
        for name, child in spec.fields.items()
    }


def section_from(cls_or_section: Union[Type[T], Section], mapping: Mapping[str, Any]) -> T:
    """An instance of a section class (or of the class of a `Section`) from a resolved section dict."""
    cls = cls_or_section.cls if isinstance(cls_or_section, Section) else cls_or_section
    if cls is None:
        raise TypeError("a Section made by hand has no class; use one read by @section (spec_of)")
    return cls(**section_values(cls, mapping))


__all__ = [
    "Section",
    "Key",
    "key",
    "section",
    "spec_of",
    "is_section_class",
    "section_values",
    "section_from",
    "type_name",
    "IGNORED",
    "FIXED",
    "EQUIVALENT",
]
