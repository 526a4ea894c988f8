"""`RunConfig`: a resolved config as one frozen, typed value, built once at launch; the root of the key tree.

run = load_run_config("configs/7B_sft.py", overrides=["parallel.tensor=2"])
run.data.seq_len, run.parallel.tensor.size     # typed sections (internlm.config.sections)
run.model_config                               # the InternLMConfig, built once
run.layout(world_size)                         # the parallel Layout
dump_config(run.raw, path)                     # the resolved Config it was made from
"""

import dataclasses
from typing import TYPE_CHECKING, Annotated, Optional

from internlm.model.config import InternLMConfig

from .container import Config
from .keys import key, section, section_values
from .model_config import model_config_from
from .sections import (
    AdamSection,
    Beta2SchedulerSection,
    CkptSection,
    DataSection,
    EvaluationSection,
    GradScalerSection,
    HealthSection,
    HybridZeroOptimizerSection,
    LossSection,
    LRSchedulerSection,
    ModelSection,
    MonitorSection,
    ParallelSection,
    PhaseSection,
    ProfileSection,
)

if TYPE_CHECKING:  # internlm.parallel imports torch.distributed machinery; load it only when a layout is asked
    from internlm.parallel.layout import Layout


@section("", doc="Top-level names of a config file.", not_keys=("raw", "file", "model_config"))
@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every top-level key of a config file as an attribute (sections as typed section objects), plus:

    ``raw``: the resolved `Config` it was made from (what is dumped and fingerprinted; it keeps the free
    UPPER_CASE constants), ``file``: the config file, ``model_config``: the model's `InternLMConfig`.
    """

    JOB_NAME: Annotated[str, key("internlm", "run name")]
    work_dir: Annotated[Optional[str], key(None, "output folder; None resolves to work_dirs/{JOB_NAME}")]
    seed: Annotated[int, key(1024, "seed of weights initialisation and data order")]
    model_type: Annotated[str, key("INTERNLM", "model family; only INTERNLM", choices=("INTERNLM",))]
    cudnn_deterministic: Annotated[bool, key(False, "torch.backends.cudnn.deterministic")]
    cudnn_benchmark: Annotated[bool, key(False, "torch.backends.cudnn.benchmark")]
    model: ModelSection
    data: DataSection
    parallel: ParallelSection
    adam: AdamSection
    lr_scheduler: LRSchedulerSection
    beta2_scheduler: Beta2SchedulerSection
    hybrid_zero_optimizer: HybridZeroOptimizerSection
    grad_scaler: GradScalerSection
    loss: LossSection
    ckpt: CkptSection
    monitor: MonitorSection
    profile: ProfileSection
    health: HealthSection
    phase: PhaseSection
    evaluation: EvaluationSection
    raw: Config = dataclasses.field(repr=False)
    file: str
    model_config: InternLMConfig

    @classmethod
    def from_config(cls, cfg: Config, file: str) -> "RunConfig":
        """The typed view of ``cfg``, a resolved config from `load_config` of ``file``."""
        return cls(**section_values(cls, cfg), raw=cfg, file=file, model_config=model_config_from(cfg))

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
            context=self.parallel.context,
            context_mode=self.parallel.context_mode,
        )


__all__ = ["RunConfig"]
