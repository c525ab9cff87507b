"""Experiment configuration: :mod:`~losslab.config.schema` (the pydantic sections) and
:mod:`~losslab.config.loading` (YAML composition, dotted overrides, validation). Every public name of
both is importable from ``losslab.config``. Code below the task layer (tasks, models, data, engine)
imports :mod:`losslab.config.schema` only: loading asks the tasks to check a config.
"""

from losslab.config.schema import (  # noqa: F401
    CONFIG_ROOT_ENV, SECTIONS, ConfigError, FixedStats, FixedNormalization, ImbalanceConfig, DataConfig,
    ModelConfig, LossConfig, OptimConfig, TiebreakMetric, TrainConfig, TrackingConfig, SegConfig, CVConfig,
    SpaceParam, SweepConfig, CalibrationConfig, TTAConfig, LatencyConfig, IntervalConfig, EvaluateConfig,
    DistillTeacherConfig, DistillStudentConfig, DistillConfig, section_dict, ExperimentConfig
)
from losslab.config.loading import (  # noqa: F401
    config_root, deep_merge, parse_override, split_overrides, apply_overrides, validate_config, load_config,
    flatten, dump_yaml
)
