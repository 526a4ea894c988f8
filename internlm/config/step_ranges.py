"""Ranges of global steps written as InternLM's ``data.skip_batches`` string: ``"5-10,20"`` means steps 5 to 10
(both included) and step 20.

InternLM's ``BatchSkipper`` reads the same syntax (ranges ``a-b`` inclusive, single numbers, comma separated). Here
the numbers are this framework's global step numbers, as metrics.jsonl and the console print them (the first step
is 1); ranges may come in any order and may overlap: they are merged. The canonical form
(`format_step_ranges`) lists merged ranges in order, a single step without a dash.
"""

from __future__ import annotations

import bisect
from typing import Iterable, List, Tuple

StepRange = Tuple[int, int]


def merge_step_ranges(ranges: Iterable[StepRange]) -> List[StepRange]:
    """``ranges`` sorted, overlapping or adjacent ones joined: ``[(8, 9), (1, 3), (4, 4)] -> [(1, 4), (8, 9)]``."""
    out: List[StepRange] = []
    for first, last in sorted(ranges):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def parse_step_ranges(text: str) -> List[StepRange]:
    """The merged ranges of a ``"5-10,20"`` string (empty or blank: none). Raises ValueError saying what is wrong
    with which part: steps are whole numbers >= 1, a range's first step is not after its last."""
    ranges: List[StepRange] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        first, dash, last = part.partition("-")
        first, last = first.strip(), (last.strip() if dash else first.strip())
        if not (first.isdigit() and last.isdigit()):
            raise ValueError(f"{part!r} is not a step or a range of steps; write e.g. '5-10,20' (steps from 1)")
        a, b = int(first), int(last)
        if a < 1:
            raise ValueError(f"{part!r}: steps are counted from 1 (the first step of the run)")
        if a > b:
            raise ValueError(f"{part!r}: the range's first step is after its last")
        ranges.append((a, b))
    return merge_step_ranges(ranges)


def format_step_ranges(ranges: Iterable[StepRange]) -> str:
    """The canonical string of ``ranges``: merged, in order, ``"5-10,20"`` ('' for none)."""
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in merge_step_ranges(ranges))


def canonical_step_ranges(text: str) -> str:
    """``text`` checked and rewritten in canonical form (the schema's normalize for ``data.skip_batches``)."""
    return format_step_ranges(parse_step_ranges(text))


class SkipBatches:
    """A set of global steps whose batches are drawn and dropped (``data.skip_batches`` syntax, `step_ranges`)."""

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self.ranges: List[StepRange] = []
        self._starts: List[int] = []
        for text in texts:
            self.add_text(text)

    def add(self, first: int, last: int) -> None:
        """Also skip steps ``first..last`` (both included)."""
        self.ranges = merge_step_ranges(self.ranges + [(int(first), int(last))])
        self._starts = [a for a, _ in self.ranges]

    def add_text(self, text: str) -> None:
        for first, last in parse_step_ranges(text or ""):
            self.add(first, last)

    def __contains__(self, step: int) -> bool:
        i = bisect.bisect_right(self._starts, step) - 1
        return i >= 0 and self.ranges[i][0] <= step <= self.ranges[i][1]

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __str__(self) -> str:
        return format_step_ranges(self.ranges)


__all__ = [
    "StepRange",
    "merge_step_ranges",
    "parse_step_ranges",
    "format_step_ranges",
    "canonical_step_ranges",
    "SkipBatches",
]
