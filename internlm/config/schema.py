"""Every config key, as one tree read from the section classes: `ROOT` is `RunConfig`'s `Section`.

Each key is declared once, as a field of its section class (`internlm.config.sections`, `RunConfig` for the
top-level names; see `internlm.config.keys`). The same tree drives validation (`internlm.config.resolve`), the
typed sections and the key reference in docs/config.md (`internlm.config.docs`), so the documentation cannot
drift from what the loader accepts. Key names and meanings follow InternLM's configs (e.g. configs/7B_sft.py);
keys this framework adds are listed in the "Differences from InternLM" section of docs/config.md.
"""

from __future__ import annotations

from typing import Iterator, Tuple, Union

from .keys import Key, Section, spec_of
from .run_config import RunConfig

ROOT: Section = spec_of(RunConfig)


def iter_fields(section: Section = ROOT, prefix: str = "") -> Iterator[Tuple[str, Union[Key, Section]]]:
    """Yield ``(dotted_path, spec)`` for every key, sections before their contents."""
    for name, spec in section.fields.items():
        path = f"{prefix}{name}"
        yield path, spec
        if isinstance(spec, Section):
            yield from iter_fields(spec, path + ".")


def is_constant(name: str) -> bool:
    """UPPER_CASE top-level names are free constants (kept, not validated) unless the schema names them."""
    return name.isupper() and name not in ROOT.fields


def lookup(path: str) -> Union[Key, Section, None]:
    """The schema entry at a dotted path, or None when the path is not in the schema."""
    spec: Union[Key, Section, None] = ROOT
    for part in path.split("."):
        if not isinstance(spec, Section) or part not in spec.fields:
            return None
        spec = spec.fields[part]
    return spec


__all__ = ["ROOT", "iter_fields", "is_constant", "lookup"]
