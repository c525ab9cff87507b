"""Experiment configuration: :mod:`losslab.schema` (the pydantic sections, at the bottom of the
package: it imports nothing of losslab) and :mod:`~losslab.config.loading` (YAML composition, dotted
overrides, validation, which asks the task to check a config and fill the task's defaults). Every
public name of both is importable from ``losslab.config``. Code below the task layer (tasks, models,
data, engine) imports :mod:`losslab.schema` only, so no package imports back into this one: the schema
lived in ``config/`` before, which made config -> tasks -> models -> config a package-level cycle.
"""

from losslab.schema import (  # noqa: F401
    CONFIG_ROOT_ENV, SECTIONS, ConfigError, FixedStats, FixedNormalization, ImbalanceConfig, DataConfig,
    ModelConfig, LossConfig, OptimConfig, TiebreakMetric, TrainConfig, TrackingConfig, SegConfig, CVConfig,
    SpaceParam, SweepConfig, CalibrationConfig, TTAConfig, LatencyConfig, IntervalConfig, EvaluateConfig,
    DistillTeacherConfig, DistillStudentConfig, DistillConfig, section_dict, ExperimentConfig
)
from losslab.config.loading import (  # noqa: F401
    config_root, deep_merge, parse_override, split_overrides, apply_overrides, validate_config, load_config,
    flatten, dump_yaml
)
