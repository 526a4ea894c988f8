"""`RunConfig`: a resolved config as one frozen, typed value, built once at launch.

run = load_run_config("configs/7B_sft.py", overrides=["parallel.tensor=2"])
run.data.seq_len, run.parallel.tensor.size     # typed sections (internlm.config.sections)
run.model_config                               # the InternLMConfig, built once
run.layout(world_size)                         # the parallel Layout
dump_config(run.raw, path)                     # the resolved Config it was made from
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

from internlm.model.config import InternLMConfig

from .container import Config
from .loader import load_config
from .model_config import model_config_from
from .sections import RootSection, section_values

if TYPE_CHECKING:  # internlm.parallel imports torch.distributed machinery; load it only when a layout is asked
    from internlm.parallel.layout import Layout


@dataclasses.dataclass(frozen=True)
class RunConfig(RootSection):
    """Every top-level key of the schema as an attribute (sections as typed section objects), plus:

    ``raw``: the resolved `Config` it was made from (what is dumped and fingerprinted; it keeps the free
    UPPER_CASE constants), ``file``: the config file, ``model_config``: the model's `InternLMConfig`.
    """

    raw: Config = dataclasses.field(repr=False)
    file: str
    model_config: InternLMConfig

    @classmethod
    def from_config(cls, cfg: Config, file: str) -> "RunConfig":
        """The typed view of ``cfg``, a resolved config from `load_config` of ``file``."""
        return cls(**section_values(RootSection, cfg), raw=cfg, file=file, model_config=model_config_from(cfg))

    def layout(self, world_size: int) -> "Layout":
        """The parallel layout of this run on ``world_size`` processes (checked by `Layout.problems`)."""
        from internlm.parallel.layout import Layout

        return Layout.create(
            world_size,
            tensor=self.parallel.tensor.size,
            pipeline=self.parallel.pipeline.size,
            zero1=self.parallel.zero1.size,
            num_chunks=self.model.num_chunks,
            sequence_parallel=self.parallel.sequence_parallel,
        )


def load_run_config(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """`load_config` of ``path`` with ``overrides`` (``key.path=value`` strings), as a `RunConfig`."""
    return RunConfig.from_config(load_config(path, overrides), path)


__all__ = ["RunConfig", "load_run_config"]
