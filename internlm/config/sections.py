"""Typed, frozen views of the sections of a resolved config, generated once from the schema.

One frozen dataclass per `Section` of `internlm.config.schema` (nested sections are nested dataclasses),
so code below `internlm.config` reads ``run.parallel.tensor.size`` instead of ``cfg["parallel"]["tensor"]``
with a default of its own::

    data = section_from(DataSection, load_config(path)["data"])
    data.seq_len, data.micro_bsz

The classes have no defaults: they are built from a resolved config (`load_config`), which holds every key.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, List, Mapping, Tuple, Type, TypeVar, Union

from .errors import ConfigError
from .schema import ROOT, Field, Section

T = TypeVar("T")

_ACRONYMS = {"lr": "LR"}

# dotted path of a section ("" for the root) -> its generated class
SECTION_CLASSES: Dict[str, type] = {}


def _class_name(key: str) -> str:
    # "lr_scheduler" -> "LRSchedulerSection", "zero1" -> "Zero1Section"
    return "".join(_ACRONYMS.get(part, part.capitalize()) for part in key.split("_")) + "Section"


def _annotation(spec: Field) -> Any:
    # (str, NoneType) -> Optional[str]; (int,) -> int
    return Union[spec.types] if len(spec.types) > 1 else spec.types[0]


def _make_section_class(name: str, section: Section, path: str) -> type:
    fields: List[Tuple[str, Any]] = []
    for key, spec in section.fields.items():
        if isinstance(spec, Section):
            child = _make_section_class(_class_name(key), spec, f"{path}.{key}" if path else key)
            fields.append((key, child))
        else:
            fields.append((key, _annotation(spec)))
    namespace = {"__module__": __name__, "__doc__": section.doc, "__config_path__": path, "__schema__": section}
    cls = dataclasses.make_dataclass(name, fields, namespace=namespace, frozen=True)
    SECTION_CLASSES[path] = cls
    return cls


def _plain(value: Any) -> Any:
    # a typed section holds plain values: nested `Config` dicts become dicts, and nothing is shared with the source
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return copy.deepcopy(value)


def is_section_class(cls: Any) -> bool:
    """Whether ``cls`` is one of the generated section classes."""
    return isinstance(cls, type) and SECTION_CLASSES.get(getattr(cls, "__config_path__", None)) is cls


def section_class(section: Union[str, Section]) -> type:
    """The generated class of a schema `Section` or of a dotted section path (``"parallel.tensor"``)."""
    if isinstance(section, str):
        if section not in SECTION_CLASSES:
            raise KeyError(f"no config section {section!r}")
        return SECTION_CLASSES[section]
    for cls in SECTION_CLASSES.values():
        if cls.__schema__ is section:
            return cls
    raise KeyError(f"no generated class for the section {section.doc!r}")


def section_values(cls: type, mapping: Mapping[str, Any]) -> Dict[str, Any]:
    """The constructor arguments of the section class ``cls`` from a resolved section dict.

    Nested sections become instances of their classes. Raises ConfigError naming a missing or unknown key.
    """
    path = cls.__config_path__
    where = f"{path}." if path else ""
    if not isinstance(mapping, Mapping):
        raise ConfigError(path, f"expected a resolved section dict, got {type(mapping).__name__} {mapping!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    for name in names:
        if name not in mapping:
            raise ConfigError(where + name, "missing; typed sections are built from a resolved config (load_config)")
    if path:  # the root also holds free UPPER_CASE constants
        for name in mapping:
            if name not in names:
                raise ConfigError(where + str(name), "not a key of this section")
    values = {}
    for field in dataclasses.fields(cls):
        value = mapping[field.name]
        values[field.name] = section_from(field.type, value) if is_section_class(field.type) else _plain(value)
    return values


def section_from(cls_or_section: Union[Type[T], Section], mapping: Mapping[str, Any]) -> T:
    """An instance of a section class (or of the class of a schema `Section`) from a resolved section dict."""
    cls = cls_or_section if isinstance(cls_or_section, type) else section_class(cls_or_section)
    if not is_section_class(cls):
        raise TypeError(f"{cls!r} is not a generated config section class")
    return cls(**section_values(cls, mapping))


# the top-level keys as one class: the base of `internlm.config.RunConfig`
RootSection = _make_section_class("RootSection", ROOT, "")

ModelSection = SECTION_CLASSES["model"]
DataSection = SECTION_CLASSES["data"]
ParallelSection = SECTION_CLASSES["parallel"]
TensorSection = SECTION_CLASSES["parallel.tensor"]
PipelineSection = SECTION_CLASSES["parallel.pipeline"]
Zero1Section = SECTION_CLASSES["parallel.zero1"]
AdamSection = SECTION_CLASSES["adam"]
LRSchedulerSection = SECTION_CLASSES["lr_scheduler"]
Beta2SchedulerSection = SECTION_CLASSES["beta2_scheduler"]
HybridZeroOptimizerSection = SECTION_CLASSES["hybrid_zero_optimizer"]
GradScalerSection = SECTION_CLASSES["grad_scaler"]
Fp16Section = SECTION_CLASSES["grad_scaler.fp16"]
LossSection = SECTION_CLASSES["loss"]
CkptSection = SECTION_CLASSES["ckpt"]
MonitorSection = SECTION_CLASSES["monitor"]
ProfileSection = SECTION_CLASSES["profile"]
PhaseSection = SECTION_CLASSES["phase"]
HealthSection = SECTION_CLASSES["health"]

__all__ = [
    "RootSection",
    "ModelSection",
    "DataSection",
    "ParallelSection",
    "TensorSection",
    "PipelineSection",
    "Zero1Section",
    "AdamSection",
    "LRSchedulerSection",
    "Beta2SchedulerSection",
    "HybridZeroOptimizerSection",
    "GradScalerSection",
    "Fp16Section",
    "LossSection",
    "CkptSection",
    "MonitorSection",
    "ProfileSection",
    "PhaseSection",
    "HealthSection",
    "SECTION_CLASSES",
    "section_class",
    "section_from",
    "section_values",
    "is_section_class",
]
