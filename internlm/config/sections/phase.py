"""The ``phase`` section: what a phase of a multi-phase run (one config file each, one work_dir) starts afresh."""

import dataclasses
from typing import Annotated, Optional

from ..keys import key, section


@section("phase")
@dataclasses.dataclass(frozen=True)
class PhaseSection:
    """Training phase: one config file per phase of a multi-phase run sharing a work_dir."""

    name: Annotated[Optional[str], key(None, "phase name; None resolves to the config file's stem")]
    reset_optimizer: Annotated[bool, key(False, "start this phase with fresh optimizer state")]
    reset_data: Annotated[bool, key(False, "start this phase at the beginning of its data")]


__all__ = ["PhaseSection"]
